import NBDProtocol
import NIOCore
import Testing
import UmbraTestSupport

@Suite struct NBDHandshakeStateMachineTests {
    /// The server greets with fixed newstyle and no-zeroes.
    @Test func greetsWithFixedNewstyleAndNoZeroes() {
        var machine = NBDHandshakeStateMachine()
        #expect(machine.start() == .send([.greeting([.fixedNewstyle, .noZeroes])]))
    }

    /// Unknown client flags close the connection; known ones (or none) do not.
    @Test func unknownClientFlagsClose() {
        for (flags, closes) in [(UInt32(0), false), (1, false), (3, false), (4, true), (0x8000_0001, true)] {
            var machine = NBDHandshakeStateMachine()
            _ = machine.start()
            #expect(machine.receivedClientFlags(flags).closes == closes, "flags \(flags)")
        }
    }

    /// EXPORT_NAME enters transmission with size and flags, and 124 zero bytes unless NO_ZEROES.
    @Test func exportNameHonoursNoZeroes() {
        for (clientFlags, padding) in [(UInt32(3), false), (1, true), (0, true)] {
            var machine = negotiatingMachine(clientFlags: clientFlags)
            let action = machine.receivedOption(.exportName, payload: ByteBuffer(string: "live"), catalog: testCatalog)
            let flags = liveExport.transmissionFlags(structuredReplies: false)
            #expect(
                action
                    == .sendAndStartTransmission(
                        [.exportNameReply(size: liveExport.size, flags: flags, zeroPadding: padding)],
                        NBDSession(
                            export: liveExport, transmissionFlags: flags, structuredReplies: false, metaContexts: [])
                    )
            )
        }
    }

    /// EXPORT_NAME for an unknown export, or with an invalid name, can only end the session.
    @Test func exportNameForUnknownExportCloses() {
        for name in ["nope", "bad\u{0}name", String(repeating: "x", count: 4097)] {
            var machine = negotiatingMachine()
            #expect(
                machine.receivedOption(.exportName, payload: ByteBuffer(string: name), catalog: testCatalog)
                    == .sendAndClose([]))
        }
    }

    /// The empty export name selects the catalog's default export.
    @Test func emptyNameIsTheDefaultExport() {
        var machine = negotiatingMachine()
        let action = machine.receivedOption(.go, payload: .infoRequest(name: "", infos: [.name]), catalog: testCatalog)
        #expect(action.session?.export.name == "live")
        #expect(action.optionReplies.first?.body == .info(.name("live")))
    }

    /// ABORT is acknowledged, even with data, and then the connection closes.
    @Test func abortIsAcknowledged() {
        for payload in [ByteBuffer(), ByteBuffer(string: "junk")] {
            var machine = negotiatingMachine()
            #expect(
                machine.receivedOption(.abort, payload: payload, catalog: testCatalog)
                    == .sendAndClose([.optionReply(.ack(.abort))]))
        }
    }

    /// LIST names every export then ACKs; LIST with data is invalid.
    @Test func listReportsEveryExport() {
        var machine = negotiatingMachine()
        let action = machine.receivedOption(.list, payload: ByteBuffer(), catalog: testCatalog)
        #expect(
            action.optionReplies == [
                NBDOptionReply(option: .list, body: .server(.init(name: "live", description: "the live volume"))),
                NBDOptionReply(option: .list, body: .server(.init(name: "live@aaaa", description: ""))),
                .ack(.list),
            ]
        )
        #expect(
            machine.receivedOption(.list, payload: ByteBuffer(string: "x"), catalog: testCatalog).replyTypes == [
                .errInvalid
            ])
    }

    /// STARTTLS is refused by policy (no TLS yet), or as invalid when it carries data.
    @Test func startTLSIsRefusedByPolicy() {
        var machine = negotiatingMachine()
        #expect(
            machine.receivedOption(.startTLS, payload: ByteBuffer(), catalog: testCatalog).replyTypes == [.errPolicy])
        #expect(
            machine.receivedOption(.startTLS, payload: ByteBuffer(string: "x"), catalog: testCatalog).replyTypes == [
                .errInvalid
            ])
        // The session carries on normally afterwards.
        #expect(machine.receivedOption(.list, payload: ByteBuffer(), catalog: testCatalog).replyTypes.last == .ack)
    }

    /// With TLS on, STARTTLS is acknowledged with the action that starts the TLS handshake; a second
    /// one after the upgrade is ERR_INVALID (proto.md), and one with data is ERR_INVALID too.
    @Test func startTLSUpgradesOnceOnly() {
        for mode in [NBDTLSMode.optional, .required] {
            var machine = negotiatingMachine(tlsMode: mode)
            #expect(
                machine.receivedOption(.startTLS, payload: ByteBuffer(string: "x"), catalog: testCatalog).replyTypes
                    == [.errInvalid])
            #expect(
                machine.receivedOption(.startTLS, payload: ByteBuffer(), catalog: testCatalog)
                    == .sendAndStartTLS([.optionReply(.ack(.startTLS))]))
            #expect(!machine.isTLSEstablished)
            #expect(machine.tlsEstablished() == .none)
            #expect(machine.isTLSEstablished)
            #expect(
                machine.receivedOption(.startTLS, payload: ByteBuffer(), catalog: testCatalog).replyTypes == [
                    .errInvalid
                ])
            #expect(
                machine.receivedOption(.go, payload: .infoRequest(name: "live"), catalog: testCatalog).session != nil)
        }
    }

    /// FORCEDTLS: before the upgrade every option but STARTTLS and ABORT gets ERR_TLS_REQD (also when
    /// oversized), EXPORT_NAME closes; after it, none does.
    @Test func requiredTLSRefusesOptionsUntilUpgraded() {
        let options: [NBDOption] = [
            .list, .info, .go, .structuredReply, .listMetaContext, .setMetaContext, .peekExport,
        ]
        var machine = negotiatingMachine(tlsMode: .required)
        for option in options {
            let payload: ByteBuffer = option == .info || option == .go ? .infoRequest(name: "live") : ByteBuffer()
            #expect(
                machine.receivedOption(option, payload: payload, catalog: testCatalog).replyTypes == [.errTLSRequired],
                "\(option)")
            #expect(machine.receivedOversizedOption(option, length: 1 << 20).replyTypes == [.errTLSRequired])
        }
        var exporting = negotiatingMachine(tlsMode: .required)
        #expect(
            exporting.receivedOption(.exportName, payload: ByteBuffer(string: "live"), catalog: testCatalog)
                == .sendAndClose([]))
        var aborting = negotiatingMachine(tlsMode: .required)
        #expect(aborting.receivedOption(.abort, payload: ByteBuffer(), catalog: testCatalog).replyTypes == [.ack])

        _ = machine.receivedOption(.startTLS, payload: ByteBuffer(), catalog: testCatalog)
        _ = machine.tlsEstablished()
        #expect(machine.receivedOption(.list, payload: ByteBuffer(), catalog: testCatalog).replyTypes.last == .ack)
        #expect(
            machine.receivedOption(.exportName, payload: ByteBuffer(string: "live"), catalog: testCatalog).session
                != nil)
    }

    /// SELECTIVETLS: plain-text clients negotiate normally, and never see ERR_TLS_REQD.
    @Test func optionalTLSServesPlainText() {
        var machine = negotiatingMachine(tlsMode: .optional)
        #expect(machine.receivedOption(.list, payload: ByteBuffer(), catalog: testCatalog).replyTypes.last == .ack)
        #expect(
            machine.receivedOption(.exportName, payload: ByteBuffer(string: "live"), catalog: testCatalog).session
                != nil)
    }

    /// Structured replies and meta contexts negotiated in plain text do not survive the upgrade
    /// (CVE-2021-3716): after TLS they must be negotiated again.
    @Test func upgradeDropsEarlierNegotiation() {
        var machine = negotiatingMachine(tlsMode: .optional)
        _ = machine.receivedOption(.structuredReply, payload: ByteBuffer(), catalog: testCatalog)
        _ = machine.receivedOption(
            .setMetaContext, payload: .metaContextRequest(name: "live", queries: ["base:allocation"]),
            catalog: testCatalog)
        _ = machine.receivedOption(.startTLS, payload: ByteBuffer(), catalog: testCatalog)
        _ = machine.tlsEstablished()
        // Meta contexts need structured replies first: refused, since those were forgotten.
        #expect(
            machine.receivedOption(
                .listMetaContext, payload: .metaContextRequest(name: "live", queries: []), catalog: testCatalog
            ).replyTypes == [.errInvalid])
        let session = machine.receivedOption(.go, payload: .infoRequest(name: "live"), catalog: testCatalog).session
        #expect(session?.structuredReplies == false)
        #expect(session?.metaContexts == [])
    }

    /// Anything the client sends between the STARTTLS ACK and the end of the TLS handshake is a
    /// protocol violation that ends the session.
    @Test func optionDuringUpgradeCloses() {
        var machine = negotiatingMachine(tlsMode: .required)
        _ = machine.receivedOption(.startTLS, payload: ByteBuffer(), catalog: testCatalog)
        #expect(machine.receivedOption(.list, payload: ByteBuffer(), catalog: testCatalog) == .sendAndClose([]))
        var oversized = negotiatingMachine(tlsMode: .optional)
        _ = oversized.receivedOption(.startTLS, payload: ByteBuffer(), catalog: testCatalog)
        #expect(oversized.receivedOversizedOption(.list, length: 1 << 20) == .sendAndClose([]))
    }

    /// INFO and GO give identical answers: block size always, name/description when asked, export, ACK.
    @Test func infoAndGoAnswerIdentically() {
        var machine = negotiatingMachine()
        let request = ByteBuffer.infoRequest(name: "live", infos: [.name, .description, .blockSize])
        let info = machine.receivedOption(.info, payload: request, catalog: testCatalog)
        let go = machine.receivedOption(.go, payload: request, catalog: testCatalog)
        let flags = liveExport.transmissionFlags(structuredReplies: false)
        let expectedBodies: [NBDOptionReply.Body] = [
            .info(.name("live")),
            .info(.description("the live volume")),
            .info(.blockSize(liveExport.blockSize)),
            .info(.export(size: liveExport.size, flags: flags)),
            .ack,
        ]
        #expect(info.optionReplies.map(\.body) == expectedBodies)
        #expect(go.optionReplies.map(\.body) == expectedBodies)
        #expect(info.optionReplies.allSatisfy { $0.option == .info })
        #expect(go.optionReplies.allSatisfy { $0.option == .go })
        #expect(info.session == nil)
        #expect(go.session?.export == liveExport)
    }

    /// INFO/GO for an unknown export get ERR_UNKNOWN and the negotiation goes on.
    @Test func goForUnknownExportIsErrUnknown() {
        var machine = negotiatingMachine()
        #expect(
            machine.receivedOption(.go, payload: .infoRequest(name: "nope"), catalog: testCatalog).replyTypes == [
                .errUnknown
            ])
        #expect(machine.receivedOption(.go, payload: .infoRequest(name: "live"), catalog: testCatalog).session != nil)
    }

    /// Malformed INFO/GO payloads are ERR_INVALID.
    @Test func malformedInfoIsInvalid() {
        var longName = ByteBuffer()
        longName.writeInteger(UInt32(5000))
        longName.writeRepeatingByte(0x61, count: 5000)
        longName.writeInteger(UInt16(0))
        let payloads: [ByteBuffer] = [
            ByteBuffer(),  // nothing at all
            ByteBuffer(bytes: [0, 0, 0, 9, 0x61]),  // name longer than the payload
            ByteBuffer(bytes: [0, 0, 0, 1, 0x61]),  // count missing
            ByteBuffer(bytes: [0, 0, 0, 0, 0, 2, 0, 1]),  // two requests announced, one present
            ByteBuffer(bytes: [0, 0, 0, 0, 0, 0, 9]),  // trailing byte
            ByteBuffer(bytes: [0, 0, 0, 2, 0xC3, 0x28, 0, 0]),  // invalid UTF-8
            ByteBuffer(bytes: [0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]),  // giant name length
            longName,
        ]
        for payload in payloads {
            var machine = negotiatingMachine()
            #expect(
                machine.receivedOption(.go, payload: payload, catalog: testCatalog).replyTypes == [.errInvalid],
                "\(payload)")
        }
    }

    /// STRUCTURED_REPLY is acknowledged and makes GO advertise DF; with data it is invalid.
    @Test func structuredReplyEnablesDF() {
        var machine = negotiatingMachine()
        #expect(
            machine.receivedOption(.structuredReply, payload: ByteBuffer(string: "x"), catalog: testCatalog).replyTypes
                == [.errInvalid])
        #expect(
            machine.receivedOption(.go, payload: .infoRequest(name: "live"), catalog: testCatalog).session?
                .transmissionFlags.contains(.sendDF) == false)
        machine = negotiatingMachine()
        #expect(
            machine.receivedOption(.structuredReply, payload: ByteBuffer(), catalog: testCatalog).replyTypes == [.ack])
        let session = machine.receivedOption(.go, payload: .infoRequest(name: "live"), catalog: testCatalog).session
        #expect(session?.structuredReplies == true)
        #expect(session?.transmissionFlags.contains(.sendDF) == true)
    }

    /// Read-only exports advertise READ_ONLY and no write-side commands; writable ones advertise them all.
    @Test func transmissionFlagsFollowTheExport() {
        let writable = liveExport.transmissionFlags(structuredReplies: true)
        #expect(
            writable == [
                .hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendFastZero, .sendDF, .sendCache,
                .canMultiConn,
            ])
        let readOnly = snapshotExport.transmissionFlags(structuredReplies: false)
        #expect(readOnly == [.hasFlags, .readOnly, .sendFlush, .sendCache, .canMultiConn])
    }

    /// Meta context options need structured replies first.
    @Test func metaContextNeedsStructuredReplies() {
        var machine = negotiatingMachine()
        for option in [NBDOption.listMetaContext, .setMetaContext] {
            let action = machine.receivedOption(
                option, payload: .metaContextRequest(name: "live", queries: []), catalog: testCatalog)
            #expect(action.replyTypes == [.errInvalid])
        }
    }

    /// LIST_META_CONTEXT follows the query rules: none means all, `ns:` lists a namespace, exact
    /// names match, unknown names and namespaces are ignored, each context once.
    @Test func listMetaContextQueries() {
        let cases: [([String], [String])] = [
            ([], ["base:allocation", "qemu:dirty-bitmap:aaaa", "qemu:dirty-bitmap:bbbb"]),
            (["base:"], ["base:allocation"]),
            (["qemu:"], ["qemu:dirty-bitmap:aaaa", "qemu:dirty-bitmap:bbbb"]),
            (["qemu:dirty-bitmap:"], ["qemu:dirty-bitmap:aaaa", "qemu:dirty-bitmap:bbbb"]),
            (["qemu:dirty-bitmap:bbbb", "base:allocation"], ["base:allocation", "qemu:dirty-bitmap:bbbb"]),
            (["base:allocation", "base:"], ["base:allocation"]),
            (["x-other:thing", "nocolon", "base:nothing", "qemu:dirty-bitmap:zzzz"], []),
        ]
        for (queries, expected) in cases {
            var machine = negotiatingMachine()
            _ = machine.receivedOption(.structuredReply, payload: ByteBuffer(), catalog: testCatalog)
            let action = machine.receivedOption(
                .listMetaContext, payload: .metaContextRequest(name: "live", queries: queries), catalog: testCatalog)
            let names = action.optionReplies.compactMap {
                if case .metaContext(let context) = $0.body { context.name } else { nil }
            }
            #expect(names == expected, "queries \(queries)")
            #expect(
                action.optionReplies.allSatisfy {
                    if case .metaContext(let context) = $0.body { context.id == 0 } else { true }
                })
            #expect(action.replyTypes.last == .ack)
        }
    }

    /// SET_META_CONTEXT selects exact names with distinct ids and the session keeps them for that export.
    @Test func setMetaContextSelectsForTheSameExport() {
        var machine = negotiatingMachine()
        _ = machine.receivedOption(.structuredReply, payload: ByteBuffer(), catalog: testCatalog)
        let queries = ["base:allocation", "qemu:dirty-bitmap:", "qemu:dirty-bitmap:bbbb", "x-foo:bar"]
        let set = machine.receivedOption(
            .setMetaContext, payload: .metaContextRequest(name: "live", queries: queries), catalog: testCatalog)
        let expected = [
            NBDMetaContext(id: 1, name: "base:allocation"), NBDMetaContext(id: 2, name: "qemu:dirty-bitmap:bbbb"),
        ]
        #expect(set.optionReplies.dropLast().map(\.body) == expected.map { .metaContext($0) })
        #expect(set.replyTypes.last == .ack)
        #expect(
            machine.receivedOption(.go, payload: .infoRequest(name: "live"), catalog: testCatalog).session?.metaContexts
                == expected)
    }

    /// Contexts selected for one export are dropped when GO names another; the default name counts as its export.
    @Test func metaContextsAreForgottenForAnotherExport() {
        var machine = negotiatingMachine()
        _ = machine.receivedOption(.structuredReply, payload: ByteBuffer(), catalog: testCatalog)
        _ = machine.receivedOption(
            .setMetaContext, payload: .metaContextRequest(name: "", queries: ["base:allocation"]), catalog: testCatalog)
        var other = machine
        #expect(
            other.receivedOption(.go, payload: .infoRequest(name: "live@aaaa"), catalog: testCatalog).session?
                .metaContexts == [])
        #expect(
            machine.receivedOption(.go, payload: .infoRequest(name: "live"), catalog: testCatalog).session?.metaContexts
                .count == 1)
    }

    /// A failed SET_META_CONTEXT still replaces the earlier selection.
    @Test func failedSetMetaContextClearsSelection() {
        var machine = negotiatingMachine()
        _ = machine.receivedOption(.structuredReply, payload: ByteBuffer(), catalog: testCatalog)
        _ = machine.receivedOption(
            .setMetaContext, payload: .metaContextRequest(name: "live", queries: ["base:allocation"]),
            catalog: testCatalog)
        let failed = machine.receivedOption(
            .setMetaContext, payload: .metaContextRequest(name: "nope", queries: ["base:allocation"]),
            catalog: testCatalog)
        #expect(failed.replyTypes == [.errUnknown])
        #expect(
            machine.receivedOption(.go, payload: .infoRequest(name: "live"), catalog: testCatalog).session?.metaContexts
                == [])
    }

    /// Malformed meta context payloads are ERR_INVALID, including counts larger than the payload.
    @Test func malformedMetaContextIsInvalid() {
        var hugeCount = ByteBuffer()
        hugeCount.writeMultipleIntegers(UInt32(0), UInt32.max)
        var truncated = ByteBuffer.metaContextRequest(name: "live", queries: ["base:allocation"])
        truncated.moveWriterIndex(to: truncated.writerIndex - 3)
        var trailing = ByteBuffer.metaContextRequest(name: "live", queries: [])
        trailing.writeInteger(UInt8(1))
        var longQuery = ByteBuffer()
        longQuery.writeMultipleIntegers(UInt32(4), UInt32(0x6c69_7665), UInt32(1), UInt32(4097))
        longQuery.writeRepeatingByte(0x61, count: 4097)
        for payload in [hugeCount, truncated, trailing, longQuery, ByteBuffer()] {
            var machine = negotiatingMachine()
            _ = machine.receivedOption(.structuredReply, payload: ByteBuffer(), catalog: testCatalog)
            #expect(
                machine.receivedOption(.listMetaContext, payload: payload, catalog: testCatalog).replyTypes == [
                    .errInvalid
                ])
        }
    }

    /// Unknown options are ERR_UNSUP and the negotiation goes on.
    @Test func unknownOptionIsUnsupported() {
        var machine = negotiatingMachine()
        for code: UInt32 in [0, 4, 11, 12, 0xFFFF_FFFF] {
            let action = machine.receivedOption(
                NBDOption(rawValue: code), payload: ByteBuffer(string: "data"), catalog: testCatalog)
            #expect(action.replyTypes == [.errUnsupported])
        }
        #expect(machine.receivedOption(.go, payload: .infoRequest(name: "live"), catalog: testCatalog).session != nil)
    }

    /// Oversized payloads: ERR_TOO_BIG for known options, ERR_UNSUP for unknown ones, close for EXPORT_NAME.
    @Test func oversizedOptions() {
        var machine = negotiatingMachine()
        #expect(machine.receivedOversizedOption(.go, length: 1 << 20).replyTypes == [.errTooBig])
        #expect(
            machine.receivedOversizedOption(NBDOption(rawValue: 77), length: 1 << 20).replyTypes == [.errUnsupported])
        #expect(machine.receivedOversizedOption(.exportName, length: 1 << 20) == .sendAndClose([]))
        machine = negotiatingMachine()
        #expect(machine.receivedOversizedOption(.abort, length: 1 << 20) == .sendAndClose([.optionReply(.ack(.abort))]))
    }

    /// During shutdown options get ERR_SHUTDOWN, except ABORT; EXPORT_NAME closes.
    @Test func shutdownRefusesOptions() {
        var machine = negotiatingMachine()
        machine.beginShutdown()
        #expect(
            machine.receivedOption(.go, payload: .infoRequest(name: "live"), catalog: testCatalog).replyTypes == [
                .errShutdown
            ])
        #expect(machine.receivedOption(.list, payload: ByteBuffer(), catalog: testCatalog).replyTypes == [.errShutdown])
        var other = machine
        #expect(
            other.receivedOption(.exportName, payload: ByteBuffer(string: "live"), catalog: testCatalog)
                == .sendAndClose([]))
        #expect(machine.receivedOption(.abort, payload: ByteBuffer(), catalog: testCatalog).closes)
    }

    /// GO binds the export exactly once, only after the request proved valid.
    @Test func goLooksUpForTransmissionOnce() {
        final class CountingCatalog: NBDExportCatalog {
            var transmissionLookups = 0
            func listExports() -> [NBDExportListing] { [] }
            func lookUpExport(named name: String, forTransmission: Bool) -> NBDExportDescription? {
                if forTransmission { transmissionLookups += 1 }
                return name == "live" ? liveExport : nil
            }
        }
        let catalog = CountingCatalog()
        var machine = negotiatingMachine()
        _ = machine.receivedOption(.info, payload: .infoRequest(name: "live"), catalog: catalog)
        _ = machine.receivedOption(.go, payload: ByteBuffer(bytes: [0, 0, 0, 4]), catalog: catalog)
        #expect(catalog.transmissionLookups == 0)
        _ = machine.receivedOption(.go, payload: .infoRequest(name: "live"), catalog: catalog)
        #expect(catalog.transmissionLookups == 1)
    }
}
