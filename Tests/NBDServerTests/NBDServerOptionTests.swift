import NBDProtocol
import NIOCore
import Testing
import UmbraTestSupport

@testable import NBDServer

private func exports() -> [MemoryExport] {
    [
        MemoryExport(name: "live", description: "the live volume", dirtyBitmaps: ["aaaa", "bbbb"]),
        MemoryExport(
            name: "live@aaaa",
            description: "snapshot aaaa",
            size: 1 << 19,
            isReadOnly: true,
            blockSize: NBDBlockSize(minimum: 512, preferred: 4096, maximum: 1 << 20),
            dirtyBitmaps: ["bbbb"]
        ),
    ]
}

@Suite struct NBDServerOptionTests {
    /// NBD_OPT_LIST reports every export with its description.
    @Test func listsExports() async throws {
        try await ServerFixture.with(exports()) { fixture in
            let client = try await fixture.negotiatingClient()
            let listed = try await blocking { try client.optList() }
            #expect(listed.map(\.name) == ["live", "live@aaaa"])
            #expect(listed.map(\.description) == ["the live volume", "snapshot aaaa"])
            try await blocking { try client.optAbort() }
        }
    }

    /// INFO reports size, flags, block size, canonical name and description; the empty name is
    /// the default export (the first in name order).
    @Test func infoDescribesExports() async throws {
        try await ServerFixture.with(exports()) { fixture in
            let client = try await fixture.negotiatingClient { client in
                try client.setFullInfo(true)
                try client.setExportName("")
            }
            try await blocking { () throws in
                try client.optInfo()
                #expect(try client.size() == 1 << 20)
                #expect(try client.canonicalExportName() == "live")
                #expect(try client.exportDescription() == "the live volume")
                #expect(try client.isReadOnly == false)
                #expect(try client.canFlush && client.canFUA && client.canTrim && client.canZero && client.canFastZero)
                #expect(try client.canCache && client.canMultiConn && client.canDF)
                #expect(try client.blockSize() == (1, 4096, 32 * 1024 * 1024))

                try client.setExportName("live@aaaa")
                try client.optInfo()
                #expect(try client.size() == 1 << 19)
                #expect(try client.isReadOnly == true)
                #expect(try client.canTrim == false && client.canZero == false && client.canFUA == false)
                #expect(try client.canFlush && client.canCache && client.canMultiConn)
                #expect(try client.blockSize() == (512, 4096, 1 << 20))
                try client.optAbort()
            }
        }
    }

    /// INFO and GO for the same export give the same answers.
    @Test func goMatchesInfo() async throws {
        try await ServerFixture.with(exports()) { fixture in
            let client = try await fixture.negotiatingClient { try $0.setExportName("live@aaaa") }
            try await blocking { () throws in
                try client.optInfo()
                let info = (
                    try client.size(), try client.isReadOnly, try client.canFlush, try client.canDF,
                    try client.blockSize()
                )
                try client.optGo()
                let go = (
                    try client.size(), try client.isReadOnly, try client.canFlush, try client.canDF,
                    try client.blockSize()
                )
                #expect(info.0 == go.0 && info.1 == go.1 && info.2 == go.2 && info.3 == go.3 && info.4 == go.4)
                try client.shutdown()
            }
        }
    }

    /// GO for an unknown export fails (ERR_UNKNOWN) and the negotiation can go on.
    @Test func goForUnknownExportFails() async throws {
        try await ServerFixture.with(exports()) { fixture in
            let client = try await fixture.negotiatingClient { try $0.setExportName("nope") }
            await #expect(throws: NBDClientError.self) { try await blocking { try client.optGo() } }
            try await blocking { () throws in
                try client.setExportName("live")
                try client.optGo()
                #expect(try client.size() == 1 << 20)
            }
        }
    }

    /// LIST_META_CONTEXT with no query lists everything; `qemu:dirty-bitmap:` lists the bitmaps.
    @Test func listsMetaContexts() async throws {
        try await ServerFixture.with(exports()) { fixture in
            let client = try await fixture.negotiatingClient { try $0.setExportName("live") }
            try await blocking { () throws in
                #expect(
                    try client.optListMetaContext() == [
                        "base:allocation", "qemu:dirty-bitmap:aaaa", "qemu:dirty-bitmap:bbbb",
                    ])
                try client.addMetaContext("qemu:dirty-bitmap:")
                #expect(try client.optListMetaContext() == ["qemu:dirty-bitmap:aaaa", "qemu:dirty-bitmap:bbbb"])
                try client.clearMetaContexts()
                try client.addMetaContext("base:")
                try client.addMetaContext("x-unknown:thing")
                #expect(try client.optListMetaContext() == ["base:allocation"])
                try client.optAbort()
            }
        }
    }

    /// SET_META_CONTEXT (sent by GO) selects exactly the named contexts the export has.
    @Test func setsMetaContexts() async throws {
        try await ServerFixture.with(exports()) { fixture in
            let client = try await fixture.connect(
                "live@aaaa",
                metaContexts: ["base:allocation", "qemu:dirty-bitmap:bbbb", "qemu:dirty-bitmap:aaaa"]
            )
            try await blocking { () throws in
                #expect(try client.canMetaContext("base:allocation"))
                #expect(try client.canMetaContext("qemu:dirty-bitmap:bbbb"))
                #expect(try !client.canMetaContext("qemu:dirty-bitmap:aaaa"))
            }
        }
    }

    /// Without structured replies there is no DF and no meta context.
    @Test func simpleRepliesOnly() async throws {
        try await ServerFixture.with(exports()) { fixture in
            let client = try await fixture.connect("live", structuredReplies: false, metaContexts: ["base:allocation"])
            try await blocking { () throws in
                #expect(try !client.structuredRepliesNegotiated)
                #expect(try !client.canDF)
                #expect(try !client.canMetaContext("base:allocation"))
                try client.pwrite([1, 2, 3], offset: 10)
                #expect(try client.pread(count: 3, offset: 10) == [1, 2, 3])
            }
        }
    }

    /// STARTTLS is refused (ERR_POLICY) and a client that only allows TLS carries on in plain text.
    @Test func startTLSIsRefused() async throws {
        try await ServerFixture.with(exports()) { fixture in
            var handshake = ByteBuffer()
            handshake.writeInteger(UInt32(3))
            handshake.writeMultipleIntegers(NBDMagic.option, NBDOption.startTLS.rawValue, UInt32(0))
            handshake.writeMultipleIntegers(NBDMagic.option, NBDOption.abort.rawValue, UInt32(0))
            let reply = try await RawClient.exchange(handshake, socketPath: fixture.socketPath)
            var stream = reply
            #expect(stream.readSlice(length: 18) != nil)  // greeting
            let replies = stream.readOptionReplies()
            #expect(replies.map(\.type) == [.errPolicy, .ack])
        }
    }

    /// The handshake honours clients without NO_ZEROES (EXPORT_NAME then sends 124 zeroes).
    @Test func exportNameWithoutNoZeroes() async throws {
        try await ServerFixture.with(exports()) { fixture in
            var bytes = ByteBuffer()
            bytes.writeInteger(UInt32(1))
            bytes.writeMultipleIntegers(NBDMagic.option, NBDOption.exportName.rawValue, UInt32(4))
            bytes.writeString("live")
            bytes.writeNBDRequest(NBDRequest(command: .disconnect, handle: 1, offset: 0, length: 0))
            var reply = try await RawClient.exchange(bytes, socketPath: fixture.socketPath)
            #expect(reply.readableBytes == 18 + 10 + 124)
            reply.moveReaderIndex(forwardBy: 18)
            #expect(reply.readInteger(as: UInt64.self) == 1 << 20)
            #expect(reply.readableBytesView.dropFirst(2).allSatisfy { $0 == 0 })
        }
    }
}
