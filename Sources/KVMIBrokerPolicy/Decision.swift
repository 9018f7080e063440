import KVMIBrokerCore

/// Lookup structures built once per policy: UUIDs and literal names in dictionaries, globs
/// compiled and bucketed by their first byte.
struct RuleIndex: Sendable {
    var byUUID: [GuestUUID: [Int]] = [:]
    var byLiteralName: [String: [Int]] = [:]
    /// Globs by their literal prefix (the text before the first wildcard, possibly empty).
    var globsByPrefix: [String: [(rule: Int, pattern: NamePattern)]] = [:]
    /// The distinct prefix lengths in bytes, ascending: a lookup probes only these.
    var prefixLengths: [Int] = []
    var metadataWanted: [Int] = []
    var metadataByIntrospector: [String: [Int]] = [:]
    /// Nova rules in policy order: few per site, so scanned.
    var novaRules: [(rule: Int, match: NovaMatch)] = []

    init(_ rules: [GuestRule]) {
        for (position, rule) in rules.enumerated() {
            switch rule.match {
            case .uuids(let uuids):
                for uuid in Set(uuids) { byUUID[uuid, default: []].append(position) }
            case .names(let names):
                for text in Set(names) {
                    // Validated by the compiler; a pattern that does not compile matches nothing.
                    guard let pattern = try? NamePattern(text) else { continue }
                    if pattern.isLiteral {
                        byLiteralName[text, default: []].append(position)
                    } else {
                        globsByPrefix[pattern.literalPrefix, default: []].append((position, pattern))
                    }
                }
            case .metadata(let values):
                for value in Set(values) {
                    if let value { metadataByIntrospector[value, default: []].append(position) } else { metadataWanted.append(position) }
                }
            case .nova(let match):
                novaRules.append((position, match))
            }
        }
        prefixLengths = Set(globsByPrefix.keys.map(\.utf8.count)).sorted()
    }
}

extension Policy {
    /// The decision for a guest: the strongest precedence class with a match decides; within it
    /// the rules must agree on the introspector, and the latest rule in policy order wins.
    public func decide(_ guest: GuestFacts) -> PolicyDecision {
        decide(uuid: guest.uuid, name: guest.name, metadata: guest.metadata, nova: guest.nova, identityVerified: guest.identityVerified)
    }

    /// The same with partial facts (`explain` may know only a UUID or only a name). A
    /// per-guest endpoint is expanded when the facts it needs are given and `identityVerified`
    /// (they are libvirt's); without them `endpoint` stays nil.
    public func decide(
        uuid: GuestUUID?, name: String?, metadata: GuestMetadata?, nova: NovaMetadata? = nil, identityVerified: Bool
    ) -> PolicyDecision {
        for matchClass in MatchClass.strongestFirst {
            let matched = matches(matchClass, uuid: uuid, name: name, metadata: metadata, nova: nova)
            if !matched.isEmpty {
                var decision = decide(matchClass, matched, metadata: metadata)
                expandEndpoint(&decision, uuid: uuid, name: name, identityVerified: identityVerified)
                return decision
            }
        }
        if let problem = nova?.problem, !index.novaRules.isEmpty {
            return .denied("no rule matches (the domain's Nova metadata cannot be read: \(problem)): not introspected (deny by default)")
        }
        return .denied("no rule matches: not introspected (deny by default)")
    }

    /// Sets the decision's endpoint for this guest. A per-guest endpoint needs the verified
    /// identity; if it is unverified, or the expansion is refused (a name holding '/', too long,
    /// ...), the guest is not introspected (fail closed when required), with the reason.
    private func expandEndpoint(_ decision: inout PolicyDecision, uuid: GuestUUID?, name: String?, identityVerified: Bool) {
        guard decision.introspected, let introspector = decision.introspector else { return }
        let template = introspector.endpoint
        if let fixed = template.fixed {
            decision.endpoint = fixed
            return
        }
        let place = decision.rule.map { " (\($0))" } ?? ""
        guard identityVerified else {
            decision.introspected = false
            decision.reason =
                "introspector '\(introspector.name)' has the per-guest endpoint \(escapedForLog(template.text)), which is expanded only from the identity libvirt verified; this guest's UUID and name are QEMU's own, unverified (libvirt identity check off)\(place): not introspected"
            return
        }
        // `explain` may lack a fact the template needs: the decision stands, the value is unknown.
        guard uuid != nil || !template.placeholders.contains(.uuid), name != nil || !template.placeholders.contains(.name) else { return }
        do throws(BrokerError) {
            decision.endpoint = try template.expanded(uuid: uuid ?? .zero, name: name ?? "")
        } catch {
            decision.introspected = false
            decision.reason = "\(error)\(place): not introspected"
        }
    }

    /// Rule positions of one class matching the guest, in policy order.
    func matches(_ matchClass: MatchClass, uuid: GuestUUID?, name: String?, metadata: GuestMetadata?, nova: NovaMetadata? = nil) -> [Int] {
        switch matchClass {
        case .nova:
            guard let nova else { return [] }
            return index.novaRules.filter { $0.match.matches(nova) }.map(\.rule)
        case .uuid:
            guard let uuid else { return [] }
            return index.byUUID[uuid] ?? []
        case .metadata:
            guard let metadata, metadata.wanted else { return [] }
            let named = metadata.introspector.flatMap { index.metadataByIntrospector[$0] } ?? []
            return named.isEmpty ? index.metadataWanted : Array(Set(index.metadataWanted + named)).sorted()
        case .name:
            guard let name else { return [] }
            var found = index.byLiteralName[name] ?? []
            var bytes = Array(name.utf8)
            bytes.withUnsafeMutableBufferPointer { buffer in
                for length in index.prefixLengths {
                    guard length <= buffer.count else { break }
                    let prefix = String(decoding: UnsafeBufferPointer(rebasing: buffer[0..<length]), as: UTF8.self)
                    guard let bucket = index.globsByPrefix[prefix] else { continue }
                    for entry in bucket where entry.pattern.matches(buffer) { found.append(entry.rule) }
                }
            }
            return Array(Set(found)).sorted()
        }
    }

    private func decide(_ matchClass: MatchClass, _ matched: [Int], metadata: GuestMetadata?) -> PolicyDecision {
        let candidates = matched.map { (rule: rules[$0], introspector: rules[$0].introspector ?? metadata?.introspector) }
        let winner = candidates[candidates.count - 1]
        var decision = PolicyDecision.denied("")
        decision.rule = winner.rule.location
        decision.matchedBy = matchClass
        decision.required = winner.rule.required || metadata?.required == true
        let disagreeing = candidates.filter { $0.introspector != winner.introspector }
        if !disagreeing.isEmpty {
            decision.conflicts = disagreeing.map(\.rule.location)
            decision.required = candidates.contains { $0.rule.required } || metadata?.required == true
            let all = (disagreeing + [winner]).map {
                "\($0.rule.location) gives \($0.introspector.map { "'\(escapedForLog($0))'" } ?? "no introspector")"
            }
            decision.reason = "conflict between \(matchClass) rules: \(all.joined(separator: "; ")): not introspected"
            return decision
        }
        decision.shadowed = candidates.dropLast().map(\.rule.location)
        let rule = winner.rule
        guard let name = winner.introspector else {
            decision.reason = "\(rule.location) takes the introspector from the domain's metadata, which names none: not introspected"
            return decision
        }
        guard let introspector = introspectors[name] else {
            decision.reason =
                "the domain's metadata names introspector '\(escapedForLog(name))', which introspectors.d does not define: not introspected"
            return decision
        }
        switch rule.resolved[introspector.abi] {
        case .resolved(let lists, _, _)?:
            decision.introspected = true
            decision.introspector = introspector
            decision.allowLists = lists
            decision.reason =
                "matched by \(matchClass) in \(rule.location): introspected by '\(name)' (ABI \(introspector.abi)), \(decision.required ? "required" : "best-effort")"
        case .missing(let names)?:
            decision.reason =
                "\(rule.location) lists names ABI \(introspector.abi) of introspector '\(name)' lacks: \(names.joined(separator: ", ")): not introspected"
        case nil:
            decision.reason = "\(rule.location) has no allow-lists for ABI \(introspector.abi): not introspected"
        }
        return decision
    }
}
