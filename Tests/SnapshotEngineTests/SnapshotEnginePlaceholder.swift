import Testing

@testable import SnapshotEngine
