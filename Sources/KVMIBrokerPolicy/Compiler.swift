import KVMIBrokerCore

/// Turns policy files into a `Policy`, collecting every diagnostic with its file and line.
struct PolicyCompiler {
    static let introspectorKeys = [
        "Description", "Endpoint", "ABI", "SecretFile", "Authentication", "HandshakeTimeout", "UnhookTimeout", "BackoffInitial", "BackoffMax",
        "AllowedPeer",
    ]
    static let guestKeys = [
        "Description", "MatchUUID", "MatchName", "MatchMetadata", "MatchNovaProject", "MatchNovaProjectName", "MatchNovaFlavor",
        "MatchNovaImage", "Introspector", "Commands", "Events", "Mode",
    ]
    /// One rule matches by one of these kinds; the Nova keys count as one kind (they combine).
    static let matchKeys = ["MatchUUID", "MatchName", "MatchMetadata"]
    static let novaKeys = ["MatchNovaProject", "MatchNovaProjectName", "MatchNovaFlavor", "MatchNovaImage"]

    let sources: PolicySources
    var diagnostics: [PolicyDiagnostic] = []
    var introspectors: [String: IntrospectorConfig] = [:]
    var replacedIntrospectors: [String: RuleLocation] = [:]
    /// Introspectors whose sections had errors: rules naming them get no second error.
    var brokenIntrospectors: Set<String> = []
    var rules: [GuestRule?] = []
    var ruleSlots: [String: Int] = [:]
    /// The line of each rule's Match key, by order.
    var matchLines: [Int: Int] = [:]
    /// Rules often share lists: resolve each distinct (lists, generation) once.
    var resolutions: [ResolutionKey: ResolvedLists] = [:]

    struct ResolutionKey: Hashable {
        var commands: [String]
        var events: [String]
        var abi: ABIGeneration
    }

    init(sources: PolicySources) { self.sources = sources }

    mutating func error(_ file: String, _ line: Int?, _ message: String, _ code: BrokerError.Code = .invalidArgument) {
        diagnostics.append(PolicyDiagnostic(.error, code, file: file, line: line, message))
    }

    mutating func warning(_ file: String, _ line: Int?, _ message: String) {
        diagnostics.append(PolicyDiagnostic(.warning, file: file, line: line, message))
    }

    mutating func compile(_ files: [SourceFile], entries: [PolicyFileEntry]) throws(PolicyLoadError) -> (Policy, [PolicyDiagnostic]) {
        for file in files { compileFile(file) }
        let effective = rules.compactMap { $0 }
        detectStaticConflicts(effective)
        if diagnostics.contains(where: { $0.severity == .error }) { throw PolicyLoadError(diagnostics: diagnostics) }
        var policy = Policy(sources: sources, introspectors: introspectors, rules: effective, files: entries)
        policy.replacedIntrospectors = replacedIntrospectors
        return (policy, diagnostics)
    }

    mutating func compileFile(_ file: SourceFile) {
        let groups: [ScannedGroup]
        let keyFile: GKeyFileHandle
        do throws(KeyFileSyntaxError) {
            groups = try KeyFileScanner.scan(file.bytes)
            keyFile = try GKeyFileHandle(file.bytes)
        } catch {
            self.error(file.path, error.line, error.message)
            return
        }
        var seen: [String: Int] = [:]
        for group in groups {
            if let first = seen[group.name] {
                error(file.path, group.line, "section [\(shown(group.name))] appears twice in this file (first at line \(first))")
                continue
            }
            seen[group.name] = group.line
            var section = SectionReader(file: file, group: group, keyFile: keyFile)
            let words = group.name.split(separator: " ", maxSplits: 1).map { String($0).trimmingWhitespace() }
            let expected = file.kind == .introspectors ? "introspector" : "guest"
            guard words.count == 2, !words[1].isEmpty else {
                error(file.path, group.line, "section [\(shown(group.name))] must be named '[\(expected) NAME]'")
                continue
            }
            let (kind, name) = (words[0], words[1])
            guard kind == expected else {
                if kind == "introspector" || kind == "guest" {
                    error(
                        file.path, group.line,
                        "[\(shown(group.name))] belongs in \(kind == "guest" ? "guests.d" : "introspectors.d"), not \(file.kind.rawValue)")
                } else {
                    error(
                        file.path, group.line,
                        "unknown section kind '\(shown(kind))' in \(file.kind.rawValue)\(didYouMean(closest(to: kind, among: [expected])))")
                }
                continue
            }
            guard name.utf8.allSatisfy({ isNameByte($0) }), let first = name.utf8.first, first != UInt8(ascii: "-"), first != UInt8(ascii: ".") else {
                error(
                    file.path, group.line,
                    "\(kind) name '\(shown(name))' may hold only letters, digits, '.', '_' and '-', and must not start with '.' or '-'")
                continue
            }
            let known = kind == "guest" ? Self.guestKeys : Self.introspectorKeys
            var keyLines: [String: Int] = [:]
            var clean = true
            for key in group.keys {
                if let earlier = keyLines[key.name] {
                    error(file.path, key.line, "\(key.name)= appears twice in [\(shown(group.name))] (first at line \(earlier))")
                    clean = false
                } else if !known.contains(key.name) {
                    error(
                        file.path, key.line,
                        "unknown key '\(shown(key.name))' in [\(shown(group.name))]\(didYouMean(closest(to: key.name, among: known)))")
                    clean = false
                }
                keyLines[key.name] = keyLines[key.name] ?? key.line
            }
            section.lines = keyLines
            let location = RuleLocation(file: file.path, line: group.line, section: group.name)
            if kind == "introspector" {
                compileIntrospector(name, location, &section, clean: clean)
            } else {
                compileGuest(name, location, &section, clean: clean)
            }
        }
    }

    // MARK: introspectors

    mutating func compileIntrospector(_ name: String, _ location: RuleLocation, _ section: inout SectionReader, clean: Bool) {
        let before = diagnostics.count
        let template: EndpointTemplate? = section.required("Endpoint", &self, example: "Endpoint=vsock:3:1234").flatMap { text in
            do throws(BrokerError) {
                return try EndpointTemplate(parsing: text)
            } catch {
                self.error(location.file, section.lines["Endpoint"], error.message)
                return nil
            }
        }
        let abi: ABIGeneration? = section.required("ABI", &self, example: "ABI=v12").flatMap { text in
            guard let abi = ABIGeneration(parsing: text) else {
                self.error(location.file, section.lines["ABI"], "ABI '\(shown(text))' is not v7 or v12")
                return nil
            }
            return abi
        }
        let secretFile = section.string("SecretFile", &self)
        if let secretFile, !secretFile.hasPrefix("/") {
            error(location.file, section.lines["SecretFile"], "SecretFile '\(shown(secretFile))' must be an absolute path")
        }
        let handshake = section.duration("HandshakeTimeout", &self) ?? IntrospectorConfig.defaultHandshakeTimeout
        let unhook = section.duration("UnhookTimeout", &self) ?? IntrospectorConfig.defaultUnhookTimeout
        let initial = section.duration("BackoffInitial", &self) ?? Backoff.default.initial
        let maximum = section.duration("BackoffMax", &self) ?? Backoff.default.maximum
        var backoff = Backoff.default
        do throws(BrokerError) {
            backoff = try Backoff(initial: initial, maximum: maximum, multiplier: Backoff.default.multiplier, jitter: Backoff.default.jitter)
        } catch {
            self.error(location.file, section.lines["BackoffMax"] ?? section.lines["BackoffInitial"], error.message)
        }
        // Kind checks (AllowedPeer, authentication) hold for every expansion of a per-guest
        // endpoint: placeholders only ever sit in a unix path or abstract name.
        let endpoint = template?.sample
        let peers = allowedPeers(endpoint, written: template?.text, location, &section)
        let authentication = self.authentication(name, template?.text, secretFile: secretFile, location, &section)
        let summary = section.string("Description", &self)
        guard clean, diagnostics.count == before, let template, let abi, let authentication else {
            brokenIntrospectors.insert(name)
            return
        }
        if authentication == .unauthenticated {
            warning(
                location.file, section.lines["Authentication"],
                "[\(location.section)] has Authentication=none: the introspector is not authenticated; any process that can listen at \(template) gets the guests' introspection"
            )
        }
        if let earlier = introspectors[name] { replacedIntrospectors[name] = earlier.location }
        introspectors[name] = IntrospectorConfig(
            name: name, endpoint: template, secretFile: secretFile, secretFileLine: section.lines["SecretFile"], authentication: authentication,
            abi: abi, handshakeTimeout: handshake, unhookTimeout: unhook, backoff: backoff, allowedPeers: peers, summary: summary,
            location: location)
    }

    /// `AllowedPeer=`: uid/user for unix endpoints (required for abstract names), cid for vsock,
    /// nothing for tcp (no peer uid travels over TCP).
    mutating func allowedPeers(
        _ endpoint: IntrospectorEndpoint?, written: String?, _ location: RuleLocation, _ section: inout SectionReader
    ) -> [AllowedPeer] {
        let before = diagnostics.count
        let line = section.lines["AllowedPeer"]
        var peers: [AllowedPeer] = []
        for item in section.list("AllowedPeer", &self) ?? [] {
            let parts = item.split(separator: ":", maxSplits: 1).map(String.init)
            let peer: AllowedPeer?
            switch (parts.first, parts.count) {
            case ("uid", 2): peer = UInt32(parts[1]).map(AllowedPeer.uid)
            case ("cid", 2): peer = UInt32(parts[1]).map(AllowedPeer.cid)
            case ("user", 2): peer = isUserName(parts[1]) ? .user(parts[1]) : nil
            default: peer = nil
            }
            guard let peer else {
                error(location.file, line, "AllowedPeer '\(shown(item))' is not 'uid:NUMBER', 'user:NAME' or 'cid:NUMBER'")
                continue
            }
            switch (peer, endpoint) {
            case (.uid, .tcp(let host, let port)?), (.user, .tcp(let host, let port)?):
                error(
                    location.file, line,
                    "AllowedPeer '\(shown(item))' cannot be verified for a tcp: endpoint (TCP carries no peer uid; only unix: sockets do). For tcp the address check is implicit in the endpoint (the broker connects only to \(IntrospectorEndpoint.tcp(host: host, port: port))); authenticate the introspector with SecretFile="
                )
            case (.cid, .tcp?):
                error(
                    location.file, line,
                    "AllowedPeer '\(shown(item))' cannot apply to a tcp: endpoint (cid goes with vsock:). For tcp the address check is implicit in the endpoint; authenticate the introspector with SecretFile="
                )
            case (.cid, .unix?), (.uid, .vsock?), (.user, .vsock?):
                error(
                    location.file, line,
                    "AllowedPeer '\(shown(item))' cannot apply to the \(endpoint.map(\.description) ?? "") endpoint (uid/user go with unix:, cid with vsock:)"
                )
            default:
                if !peers.contains(peer) { peers.append(peer) }
            }
        }
        if case .unix(let path)? = endpoint, path.hasPrefix("@"), peers.isEmpty, diagnostics.count == before {
            error(
                location.file, section.lines["Endpoint"],
                "the abstract unix endpoint \(shown(written ?? "unix:" + path)) needs AllowedPeer=uid:N or AllowedPeer=user:NAME: any local process can bind an abstract name before the introspector does, and only the listener's uid tells them apart"
            )
        }
        return peers
    }

    /// `SecretFile=` or an explicit `Authentication=none`; nil after an error.
    mutating func authentication(
        _ name: String, _ endpoint: String?, secretFile: String?, _ location: RuleLocation, _ section: inout SectionReader
    ) -> IntrospectorAuthentication? {
        let line = section.lines["Authentication"]
        switch section.string("Authentication", &self) {
        case nil where line != nil:
            return nil
        case "none"?:
            if let secretLine = section.lines["SecretFile"] {
                error(
                    location.file, line,
                    "Authentication=none contradicts SecretFile= at line \(secretLine): remove Authentication=none to authenticate with the secret"
                )
                return nil
            }
            return .unauthenticated
        case nil, "cookie"?:
            guard section.lines["SecretFile"] != nil else {
                error(
                    location.file, line ?? location.line,
                    "[\(shown(location.section))] has no SecretFile=: add SecretFile=/etc/kvmi-broker/secrets/\(name).key (the handshake cookie), or Authentication=none to trust whatever answers at \(endpoint.map { shown($0) } ?? "the endpoint")"
                )
                return nil
            }
            return secretFile == nil ? nil : .cookie
        case let other?:
            error(
                location.file, line,
                "Authentication '\(shown(other))' is not 'cookie' (with SecretFile=) or 'none'\(didYouMean(closest(to: other, among: ["cookie", "none"])))"
            )
            return nil
        }
    }

    // MARK: guest rules

    mutating func compileGuest(_ name: String, _ location: RuleLocation, _ section: inout SectionReader, clean: Bool) {
        let before = diagnostics.count
        let file = location.file
        let novaPresent = Self.novaKeys.filter { section.lines[$0] != nil }.sorted { section.lines[$0, default: 0] < section.lines[$1, default: 0] }
        let present = (Self.matchKeys.filter { section.lines[$0] != nil } + novaPresent.prefix(1)).sorted {
            section.lines[$0, default: 0] < section.lines[$1, default: 0]
        }
        var match: GuestMatch?
        if present.isEmpty {
            error(
                file, location.line,
                "[\(shown(location.section))] has no MatchUUID=, MatchName=, MatchMetadata= or MatchNova*=: it would match nothing")
        } else if present.count > 1 {
            let kind = { (key: String) in Self.novaKeys.contains(key) ? "\(key)= (the MatchNova*= keys)" : "\(key)=" }
            error(
                file, section.lines[present[1]],
                "a rule matches by one of MatchUUID=, MatchName=, MatchMetadata= or the MatchNova*= keys, and this one already has \(kind(present[0])) at line \(section.lines[present[0]] ?? 0); split it into two rules"
            )
        } else if !novaPresent.isEmpty {
            match = novaMatch(novaPresent, file: file, &section)
        } else {
            let key = present[0]
            let line = section.lines[key]
            let items = section.list(key, &self) ?? []
            if items.isEmpty && diagnostics.count == before { error(file, line, "\(key)= is empty: the rule would match nothing") }
            switch key {
            case "MatchUUID":
                var uuids: [GuestUUID] = []
                for item in items {
                    if let uuid = GuestUUID(item) {
                        uuids.append(uuid)
                    } else {
                        error(file, line, "'\(shown(item))' is not a UUID like 6695eb01-f6a4-8304-79aa-97f2502e193f")
                    }
                }
                match = .uuids(uuids)
            case "MatchName":
                for item in items {
                    do throws(BrokerError) { _ = try NamePattern(item) } catch { self.error(file, line, error.message) }
                }
                match = .names(items)
            default:
                var values: [String?] = []
                for item in items {
                    if item == "wanted" {
                        values.append(nil)
                    } else if item.hasPrefix("introspector:"), item.count > 13 {
                        values.append(String(item.dropFirst(13)))
                    } else {
                        error(file, line, "MatchMetadata value '\(shown(item))' is not 'wanted' or 'introspector:NAME'")
                    }
                }
                match = .metadata(values)
            }
        }
        var introspector = section.string("Introspector", &self)
        if introspector?.isEmpty == true { introspector = nil }
        var abi: ABIGeneration?
        if let introspector {
            if let config = introspectors[introspector] {
                abi = config.abi
            } else if !brokenIntrospectors.contains(introspector) {
                error(
                    file, section.lines["Introspector"],
                    "no introspector named '\(shown(introspector))' is defined in introspectors.d\(didYouMean(closest(to: introspector, among: introspectors.keys)))"
                )
            }
        } else if case .metadata? = match {
            // The domain's metadata names the introspector.
        } else if present.count == 1 {
            error(file, location.line, "Introspector= is missing (only MatchMetadata= rules may leave it to the domain's metadata)")
        }
        let required: Bool
        switch section.string("Mode", &self) {
        case nil, "best-effort"?: required = false
        case "required"?: required = true
        case let other?:
            required = false
            error(
                file, section.lines["Mode"],
                "Mode '\(shown(other))' is not 'required' or 'best-effort'\(didYouMean(closest(to: other, among: ["required", "best-effort"])))")
        }
        var lists: [NameKind: [String]] = [:]
        for kind in [NameKind.command, .event] {
            let key = kind == .command ? "Commands" : "Events"
            guard section.lines[key] != nil else {
                error(file, location.line, "\(key)= is missing (an empty \(key)= allows only the kernel's defaults)")
                continue
            }
            let items = section.list(key, &self) ?? []
            lists[kind] = items
            checkNames(items, kind, abi: abi, introspector: introspector, file: file, line: section.lines[key])
        }
        let summary = section.string("Description", &self)
        // Warnings (a numeric id) keep the rule; any error drops it.
        guard clean, !diagnostics[before...].contains(where: { $0.severity == .error }), let match else { return }
        var resolved: [ABIGeneration: ResolvedLists] = [:]
        for generation in ABIGeneration.allCases {
            let key = ResolutionKey(commands: lists[.command] ?? [], events: lists[.event] ?? [], abi: generation)
            if let known = resolutions[key] {
                resolved[generation] = known
            } else {
                let fresh = resolve(commands: key.commands, events: key.events, generation)
                resolutions[key] = fresh
                resolved[generation] = fresh
            }
        }
        if let abi, case .missing(let names)? = resolved[abi] {
            error(file, section.lines["Commands"], "cannot build the allow-lists for ABI \(abi): \(names.joined(separator: ", "))")
            return
        }
        for generation in ABIGeneration.allCases where abi == nil || abi == generation {
            if case .resolved(let lists, _, _)? = resolved[generation], let id = KVMINames.events(generation)["UNHOOK"], !lists.events.contains(id),
                !lists.events.contains(-1)
            {
                warning(
                    file, section.lines["Events"], "Events= lacks UNHOOK: graceful unhook is impossible (the introspector cannot be asked to let go)")
                break
            }
        }
        let order = rules.count
        var replaced: RuleLocation?
        if let slot = ruleSlots[name], let earlier = rules[slot] {
            replaced = earlier.location
            rules[slot] = nil
        }
        ruleSlots[name] = order
        matchLines[order] = section.lines[present[0]]
        rules.append(
            GuestRule(
                name: name, match: match, introspector: introspector, commands: lists[.command] ?? [], events: lists[.event] ?? [],
                required: required,
                summary: summary, location: location, replaced: replaced, resolved: resolved, order: order))
    }

    /// The MatchNova*= keys of one rule (all must match): project ids (any Keystone id; UUIDs
    /// with or without dashes), project-name and flavor globs, image UUIDs.
    mutating func novaMatch(_ keys: [String], file: String, _ section: inout SectionReader) -> GuestMatch? {
        let before = diagnostics.count
        var match = NovaMatch()
        for key in keys {
            let line = section.lines[key]
            let items = section.list(key, &self) ?? []
            if items.isEmpty && diagnostics.count == before { error(file, line, "\(key)= is empty: the rule would match nothing") }
            switch key {
            case "MatchNovaProject":
                var ids: [String] = []
                for item in items {
                    if NovaMetadata.isValidID(item) {
                        ids.append(NovaMetadata.canonicalID(item))
                    } else {
                        error(file, line, "'\(shown(item))' is not a Keystone project id like 8e6b2b4ab9e04d5f8d9e3c9c5e1a2b3c")
                    }
                }
                match.projects = ids
            case "MatchNovaImage":
                var images: [GuestUUID] = []
                for item in items {
                    if let uuid = GuestUUID(item) {
                        images.append(uuid)
                    } else {
                        error(file, line, "'\(shown(item))' is not an image UUID like 4a5e2f7c-9b1d-4c3e-8f6a-2b7d9e0c1a3f")
                    }
                }
                match.images = images
            default:
                for item in items {
                    do throws(BrokerError) { _ = try NamePattern(item) } catch { self.error(file, line, error.message) }
                }
                if key == "MatchNovaFlavor" { match.flavors = items } else { match.projectNames = items }
            }
        }
        return diagnostics.count == before ? .nova(match) : nil
    }

    /// Reports unknown names and groups, and names the introspector's generation lacks.
    mutating func checkNames(_ items: [String], _ kind: NameKind, abi: ABIGeneration?, introspector: String?, file: String, line: Int?) {
        let key = kind == .command ? "Commands" : "Events"
        for item in items {
            if item.hasPrefix("@") {
                if !PolicyGroups.names.contains(item) {
                    error(file, line, "\(key): unknown group '\(shown(item))'\(didYouMean(closest(to: item, among: PolicyGroups.names)))")
                }
                continue
            }
            if let id = numericID(item) {
                checkNumericID(id, kind, abi: abi, file: file, line: line)
                continue
            }
            let name = normalizedName(item, kind)
            let having = ABIGeneration.allCases.filter { kind.lookup(name, $0) != nil }
            let candidates = abi.map { Array(kind.table($0).keys) } ?? ABIGeneration.allCases.flatMap { kind.table($0).keys }
            let suggestion = didYouMean(closest(to: name, among: candidates))
            if having.isEmpty {
                let other: NameKind = kind == .command ? .event : .command
                if ABIGeneration.allCases.contains(where: { other.lookup(normalizeOther(item, other), $0) != nil }) {
                    error(
                        file, line,
                        "\(key): '\(shown(item))' is \(other == .event ? "an event" : "a command"), not a \(kind.rawValue); list it in \(other == .event ? "Events" : "Commands")="
                    )
                } else {
                    error(file, line, "\(key): unknown \(kind.rawValue) '\(shown(item))'\(suggestion)")
                }
            } else if let abi, !having.contains(abi), let introspector {
                let only = having.map(\.description).joined(separator: " and ")
                error(
                    file, line,
                    "\(key): ABI \(abi) has no \(kind.rawValue) '\(shown(name))' (only \(only) has it), and introspector '\(shown(introspector))' speaks \(abi)\(suggestion)"
                )
            }
        }
    }

    /// A bare id: only for an id the generation's table leaves unnamed (a newer kernel's
    /// command), within the kernel's range, and only when `Introspector=` fixes the generation
    /// (the same number means different things in v7 and v12). Accepted with a warning.
    mutating func checkNumericID(_ id: Int32, _ kind: NameKind, abi: ABIGeneration?, file: String, line: Int?) {
        let key = kind == .command ? "Commands" : "Events"
        guard let abi else {
            error(
                file, line,
                "\(key): the numeric id \(id) needs Introspector= in this rule: ids mean different \(kind.rawValue)s in ABI v7 and v12")
            return
        }
        let range = kind.numericRange(abi)
        guard range.contains(id) else {
            error(file, line, "\(key): \(kind.rawValue) id \(id) is outside ABI \(abi)'s range \(range.lowerBound)...\(range.upperBound)")
            return
        }
        if let name = kind.name(of: id, abi) {
            error(file, line, "\(key): \(kind.rawValue) id \(id) is \(name) in ABI \(abi): write the name")
            return
        }
        warning(
            file, line,
            "\(key): \(kind.rawValue) id \(id) has no name in ABI \(abi)'s table: allowed by number; check that your kernel's kvmi.h defines it"
        )
    }

    private func normalizeOther(_ item: String, _ kind: NameKind) -> String { normalizedName(item, kind) }

    /// Names and groups to ids for one generation; always-allowed commands are implicit.
    func resolve(commands: [String], events: [String], _ abi: ABIGeneration) -> ResolvedLists {
        var missing: [String] = []
        func expand(_ items: [String], _ kind: NameKind) -> [(String, Int32)] {
            var out: [String: Int32] = [:]
            for item in items {
                if let id = numericID(item) {
                    // Only an unnamed id in the generation's range (the compiler has said so for the rule's own generation).
                    if kind.numericRange(abi).contains(id), kind.name(of: id, abi) == nil { out["#\(id)"] = id } else { missing.append("#\(id)") }
                    continue
                }
                let names = item.hasPrefix("@") ? (kind.group(item, abi) ?? []) : [normalizedName(item, kind)]
                for name in names {
                    if let found = kind.lookup(name, abi) { out[found.name] = found.id } else { missing.append(name) }
                }
            }
            if kind == .command { for name in KVMINames.alwaysAllowed { out[name] = nil } }
            return out.sorted { $0.value < $1.value }
        }
        let commandPairs = expand(commands, .command)
        let eventPairs = expand(events, .event)
        if !missing.isEmpty { return .missing(missing) }
        do throws(BrokerError) {
            let lists = try Channel.AllowLists(abi: abi, commands: commandPairs.map(\.1), events: eventPairs.map(\.1))
            return .resolved(lists, commands: commandPairs.map(\.0), events: eventPairs.map(\.0))
        } catch {
            return .missing(["(\(error.message))"])
        }
    }

    // MARK: static conflicts

    /// Identical match values in two rules: different introspectors is an error naming both
    /// places; the same introspector is a warning (the later rule shadows the earlier).
    mutating func detectStaticConflicts(_ rules: [GuestRule]) {
        var seen: [ConflictKey: GuestRule] = [:]
        for rule in rules {
            let values: [ConflictKey]
            switch rule.match {
            case .uuids(let uuids): values = uuids.map(ConflictKey.uuid)
            case .names(let names): values = names.map(ConflictKey.name)
            case .metadata(let items): values = items.map(ConflictKey.metadata)
            case .nova(let match): values = [.nova(match)]
            }
            for key in values {
                defer { seen[key] = rule }
                guard let earlier = seen[key], earlier.order != rule.order else { continue }
                let line = matchLines[rule.order] ?? rule.location.line
                let label = key.label
                if earlier.introspector != rule.introspector {
                    error(
                        rule.location.file, line,
                        "\(label) gets introspector \(describe(rule.introspector)) from [\(rule.location.section)] here but \(describe(earlier.introspector)) from \(earlier.location)"
                    )
                } else {
                    warning(rule.location.file, line, "\(label) is also matched by \(earlier.location); this later rule shadows it")
                }
            }
        }
    }

    enum ConflictKey: Hashable {
        case uuid(GuestUUID)
        case name(String)
        case metadata(String?)
        case nova(NovaMatch)

        var label: String {
            switch self {
            case .uuid(let uuid): return "UUID \(uuid)"
            case .name(let name): return "name pattern '\(shown(name))'"
            case .metadata(let value): return value.map { "MatchMetadata=introspector:\($0)" } ?? "MatchMetadata=wanted"
            case .nova(let match): return match.keyText
            }
        }
    }

    private func describe(_ introspector: String?) -> String { introspector.map { "'\($0)'" } ?? "(from metadata)" }
}

/// A user name as `useradd` accepts it: letters, digits, '.', '_', '-' (not first) and a final '$'.
private func isUserName(_ name: String) -> Bool {
    var bytes = Array(name.utf8)
    if bytes.last == UInt8(ascii: "$") { bytes.removeLast() }
    guard let first = bytes.first, first != UInt8(ascii: "-"), bytes.count <= 32 else { return false }
    return bytes.allSatisfy(isNameByte)
}

private func isNameByte(_ byte: UInt8) -> Bool {
    switch byte {
    case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"): return true
    case UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "-"): return true
    default: return false
    }
}

/// Reads one section's values through GKeyFile, reporting problems at the key's line.
struct SectionReader {
    let file: SourceFile
    let group: ScannedGroup
    let keyFile: GKeyFileHandle
    var lines: [String: Int] = [:]

    init(file: SourceFile, group: ScannedGroup, keyFile: GKeyFileHandle) {
        self.file = file
        self.group = group
        self.keyFile = keyFile
    }

    func string(_ key: String, _ compiler: inout PolicyCompiler) -> String? {
        guard let line = lines[key] else { return nil }
        do throws(KeyFileSyntaxError) {
            return try keyFile.string(group.name, key).trimmingWhitespace()
        } catch {
            compiler.error(file.path, line, "\(key)=: \(error.message)")
            return nil
        }
    }

    func required(_ key: String, _ compiler: inout PolicyCompiler, example: String) -> String? {
        guard lines[key] != nil else {
            compiler.error(file.path, group.line, "[\(shown(group.name))] has no \(key)= (for example \(example))")
            return nil
        }
        guard let value = string(key, &compiler) else { return nil }
        if value.isEmpty { compiler.error(file.path, lines[key], "\(key)= is empty (for example \(example))") }
        return value.isEmpty ? nil : value
    }

    func list(_ key: String, _ compiler: inout PolicyCompiler) -> [String]? {
        guard let line = lines[key] else { return nil }
        do throws(KeyFileSyntaxError) {
            return try keyFile.list(group.name, key)
        } catch {
            compiler.error(file.path, line, "\(key)=: \(error.message)")
            return nil
        }
    }

    /// Seconds: `10`, `2.5`, `10s` or `500ms`; more than 0 and at most an hour.
    func duration(_ key: String, _ compiler: inout PolicyCompiler) -> Duration? {
        guard let text = string(key, &compiler) else { return nil }
        if let duration = parseDuration(text) { return duration }
        compiler.error(file.path, lines[key], "\(key) '\(shown(text))' is not a duration like 10, 2.5s or 500ms (more than 0, at most 3600 s)")
        return nil
    }
}

func parseDuration(_ text: String) -> Duration? {
    var number = Substring(text)
    var scale = 1.0
    if number.hasSuffix("ms") {
        number = number.dropLast(2)
        scale = 0.001
    } else if number.hasSuffix("s") {
        number = number.dropLast()
    }
    guard let value = Double(number), value.isFinite else { return nil }
    let seconds = value * scale
    guard seconds > 0, seconds <= 3600 else { return nil }
    return .milliseconds(Int64((seconds * 1000).rounded()))
}

func formatDuration(_ duration: Duration) -> String {
    let milliseconds = Int64((duration.secondsDouble * 1000).rounded())
    return milliseconds % 1000 == 0 ? "\(milliseconds / 1000)s" : "\(milliseconds)ms"
}
