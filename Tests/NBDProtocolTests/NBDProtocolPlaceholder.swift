import Testing

@testable import NBDProtocol
