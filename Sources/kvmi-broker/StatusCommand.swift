import ArgumentParser
import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon
import KVMIBrokerOS

#if canImport(Glibc)
    import Glibc
#endif

/// `kvmi-broker status`: asks the running broker over its control socket.
struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Show the running broker and its guest sessions, asked of the broker over its control socket.",
        discussion: """
            Asks the running broker (`kvmi-broker run`) over its control socket: its pid, uptime and version, the policy \
            generation and files (or the static introspector), the libvirt connection, whether identity checks are on, \
            and per guest its state, introspector, allow-lists (commands, events), how long it has been hooked and its \
            last failure. GUEST (a UUID or a name) shows that guest only. Root may read it, and members of the group \
            the broker was given with `run --control-group`; the hook's operations on the same socket stay root's.

            --json prints the document described in service.md ("Live status"): stable keys, sorted, ISO 8601 dates.

            --status-file PATH reads a status file instead (written only by a broker started with --status-file; \
            useful after a crash, or without access to the socket), and checks that the broker that wrote it still \
            runs.

            Exit status: 0 shown; 3 the broker is not running (no control socket, or nobody listens on it); 4 \
            permission denied; 5 the broker did not answer, or not understandably, in time; 6 no such guest. With \
            --status-file: 1 the file is stale (its broker is not running), 3 there is no status file, 4 it cannot \
            be read or understood, 6 no such guest.
            """)

    @Argument(help: "A guest's UUID or name: show that guest only.")
    var guest: String?

    @Option(help: "The broker's control socket (its --control-socket).")
    var controlSocket = "/run/kvmi-broker/control.sock"

    @Flag(help: "Print the status as JSON (service.md, \"Live status\").")
    var json = false

    @Option(help: "Seconds to wait for the broker's answer.")
    var timeout: Double = 10

    @Option(help: "Read this status file instead of asking the broker (a broker's --status-file).")
    var statusFile: String?

    func validate() throws {
        guard timeout > 0 && timeout <= 3600 else { throw ValidationError("--timeout must be more than 0 and at most 3600 seconds") }
    }

    func run() throws {
        do {
            if let statusFile { return try offline(statusFile) }
            let status = try ask()
            if json {
                var bytes = try LiveStatus.encoder(pretty: true).encode(status)
                bytes.append(10)
                FileHandle.standardOutput.write(bytes)
            } else {
                FileHandle.standardOutput.write(Data(status.text().utf8))
            }
        } catch let failure as Failure {
            // One line on stderr, no usage text, the failure's exit code.
            FileHandle.standardError.write(Data("kvmi-broker status: \(failure.message)\n".utf8))
            throw ExitCode(failure.code)
        }
    }

    // MARK: The live status

    private var shownSocket: String { escapedForLog(controlSocket, limit: 256) }

    /// One request, one answer, every step within --timeout.
    func ask() throws(Failure) -> LiveStatus {
        guard let body = try? JSONEncoder().encode(ControlProtocol.StatusRequest(guest: guest)) else {
            throw Failure(message: "cannot encode the request", code: 5)
        }
        let reply = try exchange(
            body, with: controlSocket, timeout: timeout, maximumAnswer: ControlProtocol.maximumStatusAnswer,
            connectFailure: connectFailure)
        let answer: ControlProtocol.StatusAnswer
        do {
            answer = try LiveStatus.decoder.decode(ControlProtocol.StatusAnswer.self, from: Data(reply))
        } catch {
            throw Failure(
                message: "the broker at \(shownSocket) answered something this kvmi-broker (\(BrokerVersion.string)) does not understand", code: 5)
        }
        if let status = answer.status { return status }
        let message = escapedForLog(answer.error ?? "no status and no reason", limit: 512)
        switch answer.code {
        case "unknown-guest": throw Failure(message: message, code: 6)
        case "permission-denied": throw Failure(message: message, code: 4)
        default: throw Failure(message: message, code: 5)
        }
    }

    /// Why the socket could not be reached, in one sentence.
    func connectFailure(_ error: BrokerError) -> Failure {
        controlSocketFailure(error, controlSocket, whoMay: whoMayRead())
    }

    /// Who may connect, from the socket's mode and group.
    func whoMayRead() -> String {
        var info = stat()
        guard stat(controlSocket, &info) == 0, info.st_mode & 0o060 == 0o060 else {
            return "only root may read the status: the broker runs without --control-group"
        }
        let group = getgrgid(info.st_gid).map { escapedForLog(String(cString: $0.pointee.gr_name), limit: 64) } ?? "\(info.st_gid)"
        return "root and members of group \(group) may read the status"
    }

    // MARK: The status file

    /// `--status-file`: the file a broker started with --status-file writes, checked for staleness.
    func offline(_ path: String) throws(Failure) {
        let data: Data
        var document: StatusDocument
        switch StatusReader.read(path) {
        case .success(let read): (data, document) = read
        case .failure(let problem): throw Failure(message: "\(problem)", code: problem.exitCode)
        }
        if let stale = StatusReader.staleness(of: document, path: path) { throw Failure(message: "\(stale)", code: stale.exitCode) }
        if let guest {
            let uuid = GuestUUID(guest).map { "\($0)" }
            document.sessions = document.sessions.filter { $0.uuid == uuid || $0.name == guest }
            if document.sessions.isEmpty {
                throw Failure(message: "no guest session named or with UUID '\(escapedForLog(guest, limit: 64))' in \(escapedForLog(path))", code: 6)
            }
        }
        if json {
            if guest == nil {
                print(String(decoding: data, as: UTF8.self))
            } else {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                encoder.dateEncodingStrategy = .iso8601
                print(String(decoding: (try? encoder.encode(document)) ?? Data(), as: UTF8.self))
            }
            return
        }
        let sessions = document.sessions
        print(
            "kvmi-broker \(escapedForLog(document.broker.version, limit: 32)) running as pid \(document.broker.pid): \(sessions.isEmpty ? "no" : "\(sessions.count)") guest session\(sessions.count == 1 ? "" : "s")"
        )
        for session in sessions {
            print(
                "\(escapedForLog(session.name, limit: 64)) \(escapedForLog(session.uuid, limit: 40)) qemu pid \(session.qemuPID): \(escapedForLog(session.state, limit: 128))"
            )
            if let identity = session.identity, identity != "libvirt" { print("    identity: \(escapedForLog(identity, limit: 64))") }
            if let failure = session.lastFailure { print("    last failure (\(session.failures) in a row): \(escapedForLog(failure, limit: 512))") }
        }
    }
}
