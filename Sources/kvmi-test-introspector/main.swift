import ArgumentParser
import Foundation
import KVMIBrokerCore
import KVMITestIntrospector

#if canImport(Glibc)
    import Glibc
#endif

/// Test equipment: an introspection tool's side of the handshake, as libkvmi does it.
struct TestIntrospectorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvmi-test-introspector",
        abstract: "A test introspector: listens, reads QEMU's handshake with libkvmi's rules and answers with the cookie hash.",
        discussion: """
            Behaviours (--mode): normal, silent, slow (one byte per second), size=N (announce struct_size N), \
            long=N (a valid reply with N extra bytes), wrong-cookie, close-mid-reply, flood (1 MiB after the reply), close-after-reply (a tool in a crash loop).
            This is test equipment, not an introspector.
            """)

    @Option(help: "Where to listen: unix:/path or tcp:ADDRESS:PORT.")
    var listen: String

    @Option(help: "The shared secret file; its exact bytes' SHA-1 is the cookie.")
    var secretFile: String?

    @Option(help: "How to behave (see below).")
    var mode: String = "normal"

    @Flag(help: "Send a KVMI_GET_VERSION message right behind the reply, in the same write, as libkvmi does.")
    var sendGetVersion = false

    @Option(help: "KVMI client mode for this ABI (v7 or v12): after the handshake, talk to the kernel as a tool does first.")
    var kvmi: String?

    @Option(help: "KVMI client mode: commands to check with VM_CHECK_COMMAND (comma-separated names).")
    var checkCommands: String = ""

    @Option(help: "KVMI client mode: events to check with VM_CHECK_EVENT (comma-separated names).")
    var checkEvents: String = ""

    @Flag(help: "KVMI client mode: on KVMI_VM_EVENT_UNHOOK keep the socket open until the other end closes it (a tool that never lets go).")
    var neverClose = false

    @Flag(
        help: """
            One guest at a time, as libkvmi: listen with a backlog of 0, and accept the next connection only after this one's \
            handshake and its GET_VERSION round trip with the kernel (up to 15 s).
            """)
    var serial = false

    @Flag(help: "Print only the listening line, not every connection (for benchmarks with many guests).")
    var quiet = false

    func run() throws {
        guard let behaviour = TestIntrospector.Behaviour(parsing: mode) else {
            throw ValidationError("unknown --mode '\(mode)'")
        }
        let endpoint = try IntrospectorEndpoint(parsing: listen)
        let secret = try secretFile.map { path -> [UInt8] in
            guard let data = FileManager.default.contents(atPath: path) else {
                throw ValidationError("cannot read --secret-file \(path)")
            }
            return Array(data)
        }
        var plan: KVMIClientPlan?
        if serial, kvmi != nil { throw ValidationError("--serial and --kvmi cannot be combined") }
        if neverClose, kvmi == nil { throw ValidationError("--never-close needs --kvmi") }
        if let kvmi {
            guard let abi = ABIGeneration(parsing: kvmi) else { throw ValidationError("--kvmi must be v7 or v12") }
            func names(_ text: String) -> [String] { text.split(separator: ",").map { String($0) } }
            plan = try KVMIClientPlan(abi: abi, commands: names(checkCommands), events: names(checkEvents), closesOnUnhook: !neverClose)
        }
        let introspector = try TestIntrospector(
            .init(endpoint: endpoint, secret: secret, behaviour: behaviour, sendsFirstMessage: sendGetVersion, kvmiClient: plan, serial: serial))
        emit("test introspector listening on \(introspector.endpoint) (\(behaviour)\(serial ? ", serial" : ""))")
        if quiet {
            while true { pause() }
        }
        var printed: [String] = []
        while true {
            let lines = introspector.records.enumerated().map { "connection \($0.offset + 1): \(Self.describe($0.element))" }
            for (index, line) in lines.enumerated() where index >= printed.count || printed[index] != line { emit(line) }
            printed = lines
            usleep(50_000)
        }
    }

    static func describe(_ record: TestIntrospector.Record) -> String {
        guard let handshake = record.handshake else { return "connection failed: \(record.error ?? "unknown")" }
        let gpa = handshake.maxGPA.map { String(format: " max_gpa=0x%llx", $0) } ?? ""
        var line =
            "handshake: \(handshake.structSize) bytes, uuid=\(handshake.uuid) name=\"\(handshake.name)\" start_time=\(handshake.startTime)\(gpa); replied \(record.bytesReplied) bytes"
        if let kvmi = record.kvmi {
            line += "; kvmi: version=\(kvmi.version.map(String.init) ?? "-")"
            for (name, err) in kvmi.checks.sorted(by: { $0.key < $1.key }) {
                line += " \(name)=\(err == 0 ? "allowed" : err == -1 ? "EPERM" : String(err))"
            }
            line += " unhook-event=\(kvmi.unhookEnabled.map { $0 == 0 ? "enabled" : String($0) } ?? "-")"
            if let ended = kvmi.ended { line += "; ended: \(ended)" }
        }
        return line
    }
}

/// Unbuffered line output, so a supervising test sees each line at once.
func emit(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

TestIntrospectorCommand.main()
