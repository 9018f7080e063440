import Foundation
import KVMIBrokerCore
import Synchronization

/// Introspectors an administrator is draining (`kvmi-broker drain`) for maintenance: no guest is
/// hooked to them, and every hooked guest is let go the way a policy reload that removes the
/// introspector lets it go (PREUNHOOK, the unhook timeout, UNHOOK). A guest the policy requires
/// is not let go unless the drain says `allowUnmonitored`: it stays hooked, and a required guest
/// that is not hooked is held (its vCPUs are not released), never run unmonitored.
///
/// Kept in memory beside the policy: a reload (SIGHUP) keeps the drains, a broker restart
/// forgets them (service.md, "Draining an introspector").
public final class IntrospectorDrains: Sendable {
    public struct Drain: Sendable, Codable, Equatable {
        public var introspector: String
        /// Required guests may be let go too (they then run unmonitored).
        public var allowUnmonitored: Bool
        public var since: Date
    }

    private let drains = Mutex<[String: Drain]>([:])

    public init() {}

    /// Starts draining `introspector` (or changes its `allowUnmonitored`).
    @discardableResult
    public func drain(_ introspector: String, allowUnmonitored: Bool) -> Drain {
        drains.withLock { drains in
            var drain = drains[introspector] ?? Drain(introspector: introspector, allowUnmonitored: allowUnmonitored, since: Date())
            drain.allowUnmonitored = allowUnmonitored
            drains[introspector] = drain
            return drain
        }
    }

    /// Ends the drain; nil when `introspector` was not draining.
    public func undrain(_ introspector: String) -> Drain? {
        drains.withLock { $0.removeValue(forKey: introspector) }
    }

    public func drain(of introspector: String) -> Drain? {
        drains.withLock { $0[introspector] }
    }

    public var all: [Drain] {
        drains.withLock { Array($0.values) }.sorted { $0.introspector < $1.introspector }
    }

    /// `decision` with the drains applied: a draining introspector hooks no guest. `hooked`: the
    /// guest is hooked now (a required one then stays hooked unless the drain allows otherwise).
    public func apply(_ decision: PlanDecision, reason: String, hooked: Bool) -> (PlanDecision, String) {
        guard case .introspect(let plan) = decision, let drain = drain(of: plan.introspectorName) else { return (decision, reason) }
        let name = escapedForLog(plan.introspectorName, limit: 64)
        if plan.required && !drain.allowUnmonitored {
            if hooked {
                return (
                    decision,
                    "\(reason); introspector \(name) is draining, but the guest is required: it stays hooked (drain --allow-unmonitored lets it go)"
                )
            }
            return (
                .requiredButUnservable(rule: plan.rule),
                "\(reason); introspector \(name) is draining: the required guest is held, not hooked (drain --allow-unmonitored lets it run)"
            )
        }
        return (.notIntrospected, "\(reason); introspector \(name) is draining (kvmi-broker drain): not hooked")
    }
}
