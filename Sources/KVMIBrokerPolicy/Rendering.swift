import KVMIBrokerCore

extension Policy {
    /// `policy explain`: the decision, the deciding rule and its file:line, the resolved ids per
    /// generation, and every other rule that matched and why it did not decide.
    /// A per-guest endpoint is shown as written and as expanded for these facts, taken as
    /// libvirt's (the daemon expands only from identity libvirt verified).
    public func explain(uuid: GuestUUID?, name: String?, metadata: GuestMetadata?, nova: NovaMetadata? = nil) -> String {
        var out: [String] = []
        let nameText = name.map { "\"\(escapedForLog($0))\"" } ?? "(unknown: name rules not consulted)"
        out.append("guest: uuid \(uuid?.description ?? "(unknown: UUID rules not consulted)"), name \(nameText)")
        out.append("metadata: \(metadata.map { escapedForLog($0.description, limit: 1024) } ?? "none")")
        if let nova { out.append("nova: \(escapedForLog(nova.description, limit: 1024))") }
        let decision = decide(uuid: uuid, name: name, metadata: metadata, nova: nova, identityVerified: true)
        switch (decision.outcome, decision.introspector) {
        case (.introspected, let introspector?):
            out.append("decision: introspected by '\(introspector.name)', \(decision.required ? "required" : "best-effort")")
        case (.requiredButUnservable, _):
            out.append("decision: not introspected, required (fail closed): the guest must not start (libvirt's hook vetoes it)")
        default:
            out.append("decision: not introspected")
        }
        out.append("reason: \(decision.reason)")
        if let location = decision.rule, let matchedBy = decision.matchedBy {
            out.append("rule: \(location) (matched by \(matchedBy))")
        }
        for location in decision.conflicts { out.append("conflicts with: \(location)") }
        for location in decision.shadowed { out.append("shadows: \(location)") }
        if let introspector = decision.introspector {
            let template = introspector.endpoint
            let perGuest = template.isPerGuest ? " (per guest)" : ""
            out.append("introspector: \(introspector.location): endpoint \(escapedForLog(template.text))\(perGuest), ABI \(introspector.abi)")
            if template.isPerGuest {
                if let endpoint = decision.endpoint {
                    out.append("endpoint for this guest: \(escapedForLog(endpoint.description))")
                } else if decision.introspected {
                    let needed = template.placeholders.map { "{\($0.rawValue)}" }.joined(separator: " and ")
                    out.append("endpoint for this guest: unknown: \(needed) needs the guest's UUID and name (give both with --domain-xml)")
                } else {
                    out.append("endpoint for this guest: none (see the reason)")
                }
            }
        }
        if let location = decision.rule, let rule = rules.first(where: { $0.location == location }) {
            out.append("allow-lists:")
            for generation in ABIGeneration.allCases.reversed() {
                let inUse = decision.introspector?.abi == generation ? " (in use)" : ""
                switch rule.resolved[generation] {
                case .resolved(_, let commands, let events)?:
                    let table = KVMINames.commands(generation)
                    let eventTable = KVMINames.events(generation)
                    out.append(
                        "  \(generation)\(inUse) commands: \(commands.map { "\($0)=\(table[$0] ?? Int32($0.dropFirst()) ?? -1)" }.joined(separator: " "))"
                    )
                    out.append(
                        "  \(generation)\(inUse) events: \(events.map { "\($0)=\(eventTable[$0] ?? Int32($0.dropFirst()) ?? -1)" }.joined(separator: " "))"
                    )
                case .missing(let names)?:
                    out.append("  \(generation)\(inUse): cannot resolve \(names.joined(separator: ", "))")
                case nil:
                    break
                }
            }
            out.append("  always allowed: \(KVMINames.alwaysAllowed.joined(separator: " "))")
        }
        var lower: [String] = []
        for matchClass in MatchClass.strongestFirst where matchClass < (decision.matchedBy ?? .name) {
            for position in matches(matchClass, uuid: uuid, name: name, metadata: metadata, nova: nova) {
                lower.append("  \(rules[position].location) (matched by \(matchClass), outranked by the \(decision.matchedBy ?? .name) rule)")
            }
        }
        if !lower.isEmpty {
            out.append("also matched, lower precedence:")
            out += lower
        }
        return out.joined(separator: "\n") + "\n"
    }

    /// `policy dump`: the effective merged policy as a key file, each section headed by where
    /// it comes from (systemd-analyze cat-config style).
    public func dump() -> String {
        var out: [String] = ["# kvmi-broker effective policy"]
        if !sources.roots.isEmpty { out.append("# roots, later overriding earlier: \(sources.roots.joined(separator: " "))") }
        out.append("# files, in the order read:")
        for entry in files {
            var line = "#   \(entry.path)"
            if entry.status == .masked { line += " (masked: symlink to /dev/null)" }
            if !entry.overrides.isEmpty { line += " (overrides \(entry.overrides.joined(separator: ", ")))" }
            out.append(line)
        }
        out.append("# precedence: UUID rules, then metadata rules, then Nova rules, then name rules; within a class the latest rule wins")
        out.append("# and the rules must agree on the introspector. No match: not introspected.")
        for name in introspectors.keys.sorted() {
            guard let config = introspectors[name] else { continue }
            out.append("")
            out.append("# \(config.location.file):\(config.location.line)\(replacedIntrospectors[name].map { " (replaces \($0))" } ?? "")")
            out.append("[introspector \(name)]")
            if let summary = config.summary { out.append("Description=\(escapeValue(summary))") }
            out.append("Endpoint=\(escapeValue(config.endpoint.description))")
            out.append("ABI=\(config.abi)")
            if let secret = config.secretFile { out.append("SecretFile=\(escapeValue(secret))") }
            if config.authentication == .unauthenticated { out.append("Authentication=none") }
            out.append("HandshakeTimeout=\(formatDuration(config.handshakeTimeout))")
            out.append("UnhookTimeout=\(formatDuration(config.unhookTimeout))")
            out.append("BackoffInitial=\(formatDuration(config.backoff.initial))")
            out.append("BackoffMax=\(formatDuration(config.backoff.maximum))")
            if !config.allowedPeers.isEmpty { out.append("AllowedPeer=\(config.allowedPeers.map(\.description).joined(separator: ";"))") }
        }
        for rule in rules {
            out.append("")
            out.append("# \(rule.location.file):\(rule.location.line)\(rule.replaced.map { " (replaces \($0))" } ?? "")")
            out.append("[guest \(rule.name)]")
            if let summary = rule.summary { out.append("Description=\(escapeValue(summary))") }
            switch rule.match {
            case .uuids(let uuids): out.append("MatchUUID=\(uuids.map(\.description).joined(separator: ";"))")
            case .names(let names): out.append("MatchName=\(names.map(escapeListItem).joined(separator: ";"))")
            case .metadata(let values):
                out.append("MatchMetadata=\(values.map { $0.map { "introspector:\($0)" } ?? "wanted" }.joined(separator: ";"))")
            case .nova(let match):
                if let projects = match.projects { out.append("MatchNovaProject=\(projects.joined(separator: ";"))") }
                if let names = match.projectNames { out.append("MatchNovaProjectName=\(names.map(escapeListItem).joined(separator: ";"))") }
                if let flavors = match.flavors { out.append("MatchNovaFlavor=\(flavors.map(escapeListItem).joined(separator: ";"))") }
                if let images = match.images { out.append("MatchNovaImage=\(images.map(\.description).joined(separator: ";"))") }
            }
            out.append(rule.introspector.map { "Introspector=\($0)" } ?? "# Introspector: the one the domain's metadata names")
            out.append("Commands=\(rule.commands.map(escapeListItem).joined(separator: ";"))")
            out.append("Events=\(rule.events.map(escapeListItem).joined(separator: ";"))")
            out.append("Mode=\(rule.required ? "required" : "best-effort")")
            for generation in ABIGeneration.allCases.reversed() {
                if let abi = rule.introspector.flatMap({ introspectors[$0]?.abi }), abi != generation { continue }
                if case .resolved(let lists, _, _)? = rule.resolved[generation] {
                    out.append(
                        "# \(generation) ids: commands \(lists.commands.map(String.init).joined(separator: ",")); events \(lists.events.map(String.init).joined(separator: ","))"
                    )
                }
            }
        }
        return out.joined(separator: "\n") + "\n"
    }
}

/// GKeyFile escaping for a string value.
func escapeValue(_ text: String) -> String {
    var out = ""
    for (offset, character) in text.enumerated() {
        switch character {
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\t": out += "\\t"
        case "\r": out += "\\r"
        case " " where offset == 0: out += "\\s"
        default: out.append(character)
        }
    }
    return out
}

func escapeListItem(_ text: String) -> String { escapeValue(text).replacingSemicolons() }

extension String {
    fileprivate func replacingSemicolons() -> String { split(separator: ";", omittingEmptySubsequences: false).joined(separator: "\\;") }
}
