import Testing
import UmbraTestSupport

@testable import BlockIO

/// The manual clock wakes a sleeper only once time passes its deadline.
@Test func manualClockWakesSleeperAtDeadline() async throws {
    let clock = ManualClock()
    async let slept: Void = clock.sleep(until: clock.now.advanced(by: .seconds(5)))
    await clock.waitForSleepers(count: 1)
    clock.advance(by: .seconds(4))
    #expect(clock.sleeperCount == 1)
    clock.advance(by: .seconds(1))
    try await slept
    #expect(clock.sleeperCount == 0)
}
