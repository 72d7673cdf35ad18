// Driving the set machine: every input goes through `drive`, which feeds the machine, re-arms the one
// deadline timer, and carries out the actions it returns (events to writers, provider calls in tasks
// of their own that report back tagged with the set's GUID, answers to the requester).

import BlockIO
import CoreMetrics
import Foundation
import Logging

extension ShadowCopyCoordinator {
    // MARK: - Driving the machine

    func validate(_ params: CreateSetParams) throws -> Duration {
        guard !params.volumes.isEmpty else {
            throw ShadowCopyError(.invalidParams, "A shadow copy set needs at least one volume.")
        }
        guard Set(params.volumes).count == params.volumes.count else {
            throw ShadowCopyError(.invalidParams, "A volume appears twice in the shadow copy set.")
        }
        guard !isShuttingDown else { throw ShadowCopyError(.shuttingDown, "The daemon is shutting down.") }
        guard let seconds = params.freezeTimeoutSeconds else { return configuration.freezeWindow }
        let secondsMax = Double(configuration.freezeWindowMax.components.seconds)
        // Range-checked before converting: a client's 1e300 must not trap the daemon.
        guard seconds.isFinite, seconds >= 0.001, seconds <= secondsMax else {
            throw ShadowCopyError(
                .invalidParams,
                "The freeze timeout must be more than 0 and at most"
                    + " \(Machine.seconds(configuration.freezeWindowMax)), not \(seconds) s."
            )
        }
        return .milliseconds(Int64((seconds * 1000).rounded()))
    }

    func acquireSlot(for requester: RequesterID, wait: Bool) async throws {
        if case .free = slot, waiting.isEmpty {
            slot = .reserved
            return
        }
        guard wait else {
            let current = currentSetID.map { " (\($0.guidString))" } ?? ""
            throw ShadowCopyError(
                .busy,
                "Another shadow copy set\(current) is in progress; try again when it finishes, or ask to wait."
            )
        }
        guard waiting.count < configuration.waitingRequestersMax else {
            throw ShadowCopyError(
                .busy,
                "\(configuration.waitingRequestersMax) requesters are already waiting for the set slot, the limit."
            )
        }
        try await withCheckedThrowingContinuation { continuation in
            waiting.append((requester, continuation))
        }
        // The slot was handed over as `.reserved` by `releaseSlot`.
    }

    func releaseSlot() {
        if waiting.isEmpty {
            slot = .free
        } else {
            slot = .reserved
            waiting.removeFirst().continuation.resume()
        }
    }

    func update(_ body: (inout ActiveSet) -> Void) {
        guard case .running(var active) = slot else { return }
        body(&active)
        slot = .running(active)
    }

    /// Feeds one input to the machine of set `id` (if it is still the running one) and carries out the
    /// actions it returns.
    func drive(set id: UUID, _ input: (inout Machine, C.Instant) -> [Machine.Action]) {
        guard case .running(var active) = slot, active.machine.id == id else { return }
        let actions = input(&active.machine, clock.now)
        slot = .running(active)
        syncStatuses()
        // The timer is armed before events go out, so a writer that sees an event knows its deadline runs.
        rearmTimer()
        for action in actions { perform(action, set: id) }
    }

    func syncStatuses() {
        guard case .running(let active) = slot else { return }
        for participant in active.machine.participants {
            if let status = active.machine.status(of: participant.id) { writers[participant.id]?.status = status }
        }
    }

    func perform(_ action: Machine.Action, set id: UUID) {
        guard case .running(let active) = slot else { return }
        let machine = active.machine
        switch action {
        case .send(let event, let targets):
            for target in targets { send(event, to: target, machine: machine) }
        case .flushProvider:
            flushes[id] = Task { [provider] in
                try? await provider.flushVolumes(machine.volumes)
                self.flushFinished(set: id)
            }
        case .prepareProvider(let flushingFirst):
            let task = Task { [provider] in
                do {
                    let token = try await provider.prepareSnapshotSet(
                        id: id, volumes: machine.volumes, flushingFirst: flushingFirst)
                    self.prepared(set: id, token: token)
                } catch {
                    self.drive(set: id) { machine, now in
                        machine.providerPrepareFailed(ShadowCopyError.wrapping(error, as: .providerFailed), now: now)
                    }
                }
            }
            update { $0.prepareTask = task }
        case .cancelPrepare:
            active.prepareTask?.cancel()
        case .commitProvider(let keep):
            guard let token = active.token else { preconditionFailure("commit without a hold") }
            Task { [provider] in
                do {
                    let committed = try await provider.commitSnapshotSet(token, keep: keep)
                    self.drive(set: id) { machine, now in machine.providerCommitted(committed, now: now) }
                } catch {
                    self.drive(set: id) { machine, now in
                        machine.providerCommitFailed(ShadowCopyError.wrapping(error, as: .providerFailed), now: now)
                    }
                }
            }
        case .keepSet:
            Task { [provider] in
                do {
                    try await provider.keepSnapshotSet(id: id)
                    self.drive(set: id) { machine, now in machine.providerKept(now: now) }
                } catch {
                    self.drive(set: id) { machine, now in
                        machine.providerKeepFailed(ShadowCopyError.wrapping(error, as: .providerFailed), now: now)
                    }
                }
            }
        case .releaseProvider:
            guard let token = active.token else { preconditionFailure("release without a hold") }
            Task { [provider] in
                await provider.abortSnapshotSet(token)
                self.drive(set: id) { machine, _ in machine.providerReleased() }
            }
        case .deleteSet:
            Task { [provider] in
                var failure: ShadowCopyError?
                do {
                    try await provider.deleteSnapshotSet(id: id)
                } catch {
                    failure = ShadowCopyError.wrapping(error, as: .providerFailed)
                }
                self.drive(set: id) { [failure] machine, _ in machine.setDeleted(error: failure) }
            }
        case .setOpen:
            guard let result = machine.result() else { preconditionFailure("open before commit") }
            update { $0.createWaiter?.resume(returning: result) }
            update { $0.createWaiter = nil }
        case .finish(let outcome):
            finish(active, outcome: outcome)
        }
    }

    func flushFinished(set id: UUID) {
        flushes[id] = nil
    }

    func prepared(set id: UUID, token: Provider.HoldToken) {
        update { if $0.machine.id == id { $0.token = token } }
        drive(set: id) { machine, now in machine.providerPrepared(now: now) }
    }

    func send(_ event: WriterEvent, to writer: WriterID, machine: Machine) {
        guard var record = writers[writer] else { return }
        record.nextRequestID += 1
        let requestID = record.nextRequestID
        // Events of earlier sets that were never answered (a hung writer) are forgotten here.
        record.outstanding = record.outstanding.filter { $0.value.set == machine.id }
        record.outstanding[requestID] = (machine.id, event)
        writers[writer] = record
        // A writer must answer Freeze within the freeze window too, whichever ends first.
        let answerWithin =
            event == .freeze
            ? min(configuration.eventTimeout, machine.configuration.freezeWindow) : configuration.eventTimeout
        let params = WriterEventParams(
            set: machine.id,
            volumes: machine.volumes,
            timeoutMs: Self.milliseconds(answerWithin),
            freezeWindowMs: event == .freeze ? Self.milliseconds(machine.configuration.freezeWindow) : nil,
            snapshots: [.thaw, .postSnapshot, .backupComplete, .abort].contains(event)
                ? machine.committed?.snapshots : nil,
            reason: event == .abort ? machine.failure?.message : nil
        )
        record.sink(WriterEventDelivery(requestID: requestID, event: event, params: params))
    }

    /// The one log line per set: its outcome, how long it took, how long writes were held, and the
    /// writers with the state each ended in.
    func logFinished(_ active: ActiveSet, result: SnapshotSetResult?, error: ShadowCopyError?) {
        func milliseconds(_ duration: Duration) -> String {
            let (seconds, attoseconds) = duration.components
            return String(format: "%.1f", Double(seconds) * 1000 + Double(attoseconds) / 1e15)
        }
        var metadata: Logger.Metadata = [
            "shadow.set": "\(active.machine.id.guidString)",
            "shadow.volumes": "\(active.machine.volumes.joined(separator: ","))",
            "shadow.duration_ms": "\(milliseconds(active.startedAt.duration(to: clock.now)))",
        ]
        // As the provider measured it, draining included; absent if writes were never held.
        if let hold = active.token.flatMap(provider.holdDuration(of:)) {
            metadata["shadow.hold_ms"] = "\(milliseconds(hold))"
        }
        let writers = result?.writers ?? active.machine.writerInfos()
        metadata["shadow.writers"] = "\(writers.map { "\($0.name):\($0.state.rawValue)" }.joined(separator: ","))"
        if let error {
            metadata["shadow.error"] = "\(error.message)"
            logger.notice("shadow copy set aborted", metadata: metadata)
        } else {
            logger.info("shadow copy set created", metadata: metadata)
        }
    }

    /// Through swift-metrics (the application chooses the backend): sets by result, how long each
    /// took and how long it held writes. `aborted` is a set its requester or the daemon's shutdown
    /// ended; `failed` one a writer, a deadline or the provider ended.
    func countFinished(_ active: ActiveSet, error: ShadowCopyError?) {
        let result =
            switch error?.code {
            case nil: "committed"
            case .aborted?, .shuttingDown?: "aborted"
            default: "failed"
            }
        Counter(label: "umbra_sets_total", dimensions: [("result", result)]).increment()
        CoreMetrics.Timer(label: "umbra_set_seconds").recordNanoseconds(
            active.startedAt.duration(to: clock.now).wholeNanoseconds)
        if let hold = active.token.flatMap(provider.holdDuration(of:)) {
            CoreMetrics.Timer(label: "umbra_set_hold_seconds").recordNanoseconds(hold.wholeNanoseconds)
        }
    }

    func finish(_ active: ActiveSet, outcome: Machine.Outcome) {
        active.timer?.cancel()
        defer { for waiter in active.finishWaiters { waiter.resume() } }
        switch outcome {
        case .created:
            let result = active.machine.result()!
            countFinished(active, error: nil)
            logFinished(active, result: result, error: nil)
            active.createWaiter?.resume(returning: result)
            active.completeWaiter?.resume(returning: result)
            active.abortWaiter?.resume()
        case .failed(let error):
            countFinished(active, error: error)
            logFinished(active, result: nil, error: error)
            active.createWaiter?.resume(throwing: error)
            active.completeWaiter?.resume(throwing: error)
            active.abortWaiter?.resume()
        }
        releaseSlot()
    }

    func rearmTimer() {
        guard case .running(let active) = slot else { return }
        let deadline = active.machine.nextDeadline
        guard deadline != active.timerDeadline else { return }
        active.timer?.cancel()
        let id = active.machine.id
        let timer = deadline.map { deadline in
            Task { [clock] in
                do {
                    try await clock.sleep(until: deadline, tolerance: nil)
                } catch {
                    return
                }
                self.timerFired(set: id, deadline: deadline)
            }
        }
        update {
            $0.timer = timer
            $0.timerDeadline = deadline
        }
    }

    func timerFired(set id: UUID, deadline: C.Instant) {
        guard case .running(let active) = slot, active.machine.id == id, active.timerDeadline == deadline else {
            return
        }
        update {
            $0.timer = nil
            $0.timerDeadline = nil
        }
        drive(set: id) { machine, now in machine.deadlinePassed(now: now) }
    }

    static func milliseconds(_ duration: Duration) -> Int64 {
        let (seconds, attoseconds) = duration.components
        return seconds * 1000 + attoseconds / 1_000_000_000_000_000
    }
}
