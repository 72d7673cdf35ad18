import Testing

@testable import ShadowCopy
