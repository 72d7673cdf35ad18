import Testing

@testable import NBDServer
