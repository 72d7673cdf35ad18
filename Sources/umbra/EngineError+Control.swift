// The control protocol's codes for engine errors: the one table for that protocol (the NBD errnos
// are the engine's own table, `EngineError.errno`). It lives in the daemon because the engine does
// not know the control protocol.

import ShadowCopy
import SnapshotEngine

extension EngineError {
    /// The code a requester sees, for the errors that are the caller's doing or the daemon's state;
    /// nil for failures, which reach the requester as `provider-failed` or `internal` with their
    /// sentence.
    var controlErrorCode: ControlErrorCode? {
        switch self {
        case .volumeNotFound, .snapshotNotFound: .notFound
        case .volumeExists: .alreadyExists
        case .invalidVolumeName, .invalidSize, .invalidChunkSize, .invalidSnapshotSet, .snapshotOrder,
            .volumeHasSnapshots, .tooManySnapshots, .snapshotFailed, .volumeReverting:
            .invalidArgument
        case .closed: .shuttingDown
        case .outOfRange, .snapshotDeleted, .directoryLocked, .notADataDirectory, .unsupportedFormatVersion,
            .corruptCatalog, .holdExpired, .holdNotActive, .storageFailed, .damagedCopy, .io, .cannotZeroQuickly,
            .revertIncomplete:
            nil
        }
    }
}

/// The control protocol's view of an error: an engine error with a code becomes that code with the
/// engine's sentence; anything else passes as it is.
func controlError(_ error: any Error) -> any Error {
    guard let engine = error as? EngineError, let code = engine.controlErrorCode else { return error }
    return ShadowCopyError(code, sentence(engine.description))
}
