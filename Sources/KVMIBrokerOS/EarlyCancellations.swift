/// The waits whose id is given out but whose continuation is not registered yet, and those of
/// them cancelled meanwhile: a cancellation handler can run before the wait registers (then the
/// wait must end at once when it does) or after the wait ended (then it must leave nothing
/// behind). Kept under its owner's lock (`IOReactor`, `Mailbox`).
@usableFromInline
struct EarlyCancellations {
    @usableFromInline var unregistered: Set<UInt64> = []
    @usableFromInline var cancelled: Set<UInt64> = []

    @usableFromInline
    init() {}

    /// `id` was given out to a wait that has not registered yet.
    @inlinable
    mutating func given(_ id: UInt64) {
        unregistered.insert(id)
    }

    /// The wait `id` registers now; true if it was cancelled before (it must end at once).
    @inlinable
    mutating func register(_ id: UInt64) -> Bool {
        unregistered.remove(id)
        return cancelled.remove(id) != nil
    }

    /// A cancellation found no registered wait `id`: noted only if the wait is still to come.
    @inlinable
    mutating func cancel(_ id: UInt64) {
        if unregistered.contains(id) { cancelled.insert(id) }
    }

    /// Ids held (for tests: nothing may stay behind).
    var count: Int { unregistered.count + cancelled.count }
}
