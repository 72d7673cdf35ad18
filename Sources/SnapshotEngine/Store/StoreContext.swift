import BlockIO
import Logging
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Shared by a store and its volumes.
final class StoreContext: Sendable {
    let catalog: CatalogLog
    let io: any IOExecutor
    let configuration: StoreConfiguration
    let closed = Atomic<Bool>(false)

    var logger: Logger { configuration.logger }

    init(catalog: CatalogLog, io: any IOExecutor, configuration: StoreConfiguration) {
        self.catalog = catalog
        self.io = io
        self.configuration = configuration
    }
}
