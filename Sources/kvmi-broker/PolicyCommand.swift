import ArgumentParser
import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon
import KVMIBrokerLibvirt
import KVMIBrokerPolicy

/// `kvmi-broker policy`: check, explain and dump the allow-policy.
struct PolicyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "policy",
        abstract: "Check, explain and dump the allow-policy (introspectors.d/ and guests.d/ under each root).",
        subcommands: [PolicyCheckCommand.self, PolicyExplainCommand.self, PolicyDumpCommand.self])
}

/// Options shared by the policy subcommands.
struct PolicyRootOptions: ParsableArguments {
    @Option(
        name: .customLong("root"),
        help: "A policy root holding introspectors.d/ and guests.d/ (repeatable; later roots override same-named files of earlier ones).")
    var roots: [String] = PolicySources.defaultRoots

    @Flag(
        help:
            "Accept policy and secret files not owned by root (for checking a working copy); group- or world-writable files are still refused.")
    var allowNonRootOwner = false

    var sources: PolicySources { PolicySources(roots: roots, requireRootOwnership: !allowNonRootOwner) }

    /// Loads the policy and every secret it names exactly as the daemon does (start and
    /// SIGHUP), printing every diagnostic to standard error; exits 1 on errors.
    func load(_ command: String) throws -> (Policy, [PolicyDiagnostic]) {
        do {
            let (policy, _, warnings) = try PolicyStore.loadWithSecrets(sources)
            for warning in inReadingOrder(warnings) { printError("\(warning)") }
            return (policy, warnings)
        } catch {
            for diagnostic in inReadingOrder(error.diagnostics) { printError("\(diagnostic)") }
            printError("kvmi-broker policy \(command): \(error.errors.count) error\(error.errors.count == 1 ? "" : "s"); the policy is not usable")
            throw ExitCode(1)
        }
    }
}

/// Diagnostics grouped by file (in the order files were first mentioned), then by line.
func inReadingOrder(_ diagnostics: [PolicyDiagnostic]) -> [PolicyDiagnostic] {
    var rank: [String: Int] = [:]
    for diagnostic in diagnostics where rank[diagnostic.file ?? ""] == nil { rank[diagnostic.file ?? ""] = rank.count }
    return diagnostics.enumerated().sorted { a, b in
        let left = (rank[a.element.file ?? ""] ?? 0, a.element.line ?? 0, a.offset)
        let right = (rank[b.element.file ?? ""] ?? 0, b.element.line ?? 0, b.offset)
        return left < right
    }.map(\.element)
}

func printError(_ text: String) {
    FileHandle.standardError.write(Data((text + "\n").utf8))
}

struct PolicyCheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract:
            "Check the policy exactly as the daemon loads it, secret files included; print file:line errors; exit 1 on any error.")

    @OptionGroup var options: PolicyRootOptions

    @Argument(help: "Policy roots, as with --root (kvmi-broker policy check /etc/kvmi-broker).")
    var directories: [String] = []

    @Flag(help: "Treat warnings as errors.")
    var strict = false

    func run() throws {
        var options = self.options
        if !directories.isEmpty {
            options.roots = (options.roots == PolicySources.defaultRoots ? [] : options.roots) + directories
        }
        let (policy, warnings) = try options.load("check")
        let read = policy.files.filter { $0.status == .read }.count
        print(
            "policy ok: \(read) file\(read == 1 ? "" : "s"), \(policy.introspectors.count) introspector\(policy.introspectors.count == 1 ? "" : "s"), \(policy.rules.count) guest rule\(policy.rules.count == 1 ? "" : "s"), \(warnings.count) warning\(warnings.count == 1 ? "" : "s")"
        )
        if strict && !warnings.isEmpty { throw ExitCode(1) }
    }
}

struct PolicyExplainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "explain",
        abstract: "Show the decision for a guest, the rule behind it (file:line) and the command and event ids per ABI generation.",
        discussion: """
            GUEST is a UUID or a name. With --domain-xml (virsh dumpxml), the UUID, the name and the \
            <introspection xmlns="\(GuestMetadata.namespace)"> metadata element are read from the XML, and so is \
            OpenStack Nova's <nova:instance> (project, flavor, image) for MatchNova*= rules.
            """)

    @OptionGroup var options: PolicyRootOptions

    @Argument(help: "The guest's UUID or name (optional with --domain-xml).")
    var guest: String?

    @Option(help: "A libvirt domain XML file to read the UUID, name and metadata from.")
    var domainXML: String?

    @Option(help: "Metadata to assume without a domain XML: 'wanted' or 'introspector:NAME'.")
    var metadata: String?

    func validate() throws {
        guard guest != nil || domainXML != nil else { throw ValidationError("give a GUEST (UUID or name) or --domain-xml") }
        if let metadata, metadata != "wanted", !metadata.hasPrefix("introspector:") {
            throw ValidationError("--metadata must be 'wanted' or 'introspector:NAME'")
        }
    }

    func run() throws {
        var uuid: GuestUUID?
        var name: String?
        var nova: NovaMetadata?
        var facts: GuestMetadata? = metadata.map { $0 == "wanted" ? GuestMetadata() : GuestMetadata(introspector: String($0.dropFirst(13))) }
        if let domainXML {
            do {
                let text = try String(contentsOfFile: domainXML, encoding: .utf8)
                let domain = try DomainDescription(xml: text)
                uuid = domain.uuid
                name = domain.name
                facts = domain.metadata.map { GuestMetadata(wanted: $0.wanted, introspector: $0.introspector, required: $0.required) } ?? facts
                nova = domain.nova
            } catch let error as BrokerError {
                printError("kvmi-broker policy explain: \(escapedForLog(domainXML)): \(escapedForLog(error.message, limit: 1024))")
                throw ExitCode(1)
            } catch {
                printError("kvmi-broker policy explain: \(escapedForLog(domainXML)): \(escapedForLog(error.localizedDescription, limit: 1024))")
                throw ExitCode(1)
            }
        }
        if let guest {
            if let parsed = GuestUUID(guest) {
                if let uuid, uuid != parsed {
                    printError("kvmi-broker policy explain: \(guest) is not the UUID in \(escapedForLog(domainXML ?? "")) (\(uuid))")
                    throw ExitCode(1)
                }
                uuid = parsed
            } else {
                if let name, name != guest {
                    printError(
                        "kvmi-broker policy explain: '\(escapedForLog(guest))' is not the name in \(escapedForLog(domainXML ?? "")) ('\(escapedForLog(name))')"
                    )
                    throw ExitCode(1)
                }
                name = guest
            }
        }
        let (policy, _) = try options.load("explain")
        print(policy.explain(uuid: uuid, name: name, metadata: facts, nova: nova), terminator: "")
    }
}

struct PolicyDumpCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dump",
        abstract: "Print the effective merged policy as a key file, each section with the file:line it comes from.")

    @OptionGroup var options: PolicyRootOptions

    func run() throws {
        print(try options.load("dump").0.dump(), terminator: "")
    }
}
