import NBDProtocol
import NIOCore

// A served request as a call of its export: what the export is asked and what comes back. Runs in
// the request's task (see EventLoopTaskExecutor); errors become the outcome, and their errno is
// chosen when the reply is written (NBDError).

enum NBDExportCall {
    enum Outcome: Sendable {
        case done
        case read(NBDReadResult)
        case blockStatus([(NBDMetaContext, [NBDExtent])])
        case failed(any Error)
    }

    static func call(
        _ request: NBDRequest,
        payload: NBDWritePayload?,
        contexts: [NBDMetaContext],
        on export: any NBDExport,
        buffers: NBDBufferPool,
        allowsFiles: Bool
    ) async -> Outcome {
        let fua = request.flags.contains(.fua)
        do {
            switch request.command {
            case .read:
                let result = try await export.read(
                    offset: request.offset, length: request.length, buffers: buffers, allowsFileSegments: allowsFiles)
                return .read(allowsFiles ? result : try result.copyingFileSegments(buffers: buffers))
            case .write:
                try await export.write(offset: request.offset, data: payload ?? NBDWritePayload(ByteBuffer()), fua: fua)
            case .flush:
                try await export.flush()
            case .trim:
                try await export.trim(offset: request.offset, length: request.length, fua: fua)
            case .cache:
                try await export.cache(offset: request.offset, length: request.length)
            case .writeZeroes:
                try await export.writeZeroes(
                    offset: request.offset,
                    length: request.length,
                    mayTrim: !request.flags.contains(.noHole),
                    fast: request.flags.contains(.fastZero),
                    fua: fua
                )
            case .blockStatus:
                var chunks: [(NBDMetaContext, [NBDExtent])] = []
                chunks.reserveCapacity(contexts.count)
                for context in contexts {
                    let extents = try await export.blockStatus(
                        context: context.name,
                        offset: request.offset,
                        length: request.length
                    )
                    chunks.append((context, extents))
                }
                return .blockStatus(chunks)
            default:
                return .failed(NBDError(.einval, "\(request.command) is not served"))
            }
            return .done
        } catch {
            return .failed(error)
        }
    }

    /// Lets go of the file segments of a read nobody will send.
    static func releaseFiles(of outcome: Outcome) {
        guard case .read(let result) = outcome else { return }
        switch result {
        case .file(let file): file.release?()
        case .segments(let segments): for case .file(let file) in segments { file.release?() }
        case .data, .zeroes: break
        }
    }
}
