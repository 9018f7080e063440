import ArgumentParser
import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon

/// `kvmi-broker drain INTROSPECTOR`: maintenance of an introspector, through the control socket.
struct DrainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "drain", abstract: "Let go of every guest hooked to an introspector, and hook no new one to it, for maintenance.",
        discussion: """
            Asks the running broker (root only) to drain INTROSPECTOR (a policy [introspector NAME], or \
            'command-line' for a broker run with --introspector): no guest is hooked to it any more, and every hooked \
            guest is let go gracefully, as a policy reload that removes the introspector does: PREUNHOOK, then its \
            UnhookTimeout, then UNHOOK. Guests the policy requires (Required=yes) stay hooked, and required guests \
            that are not hooked are held (their vCPUs are not released), unless --allow-unmonitored: then they are let \
            go and run unmonitored. The drain survives a policy reload (SIGHUP) and ends with `kvmi-broker undrain` or \
            a broker restart. It is audit-logged; `kvmi-broker status` shows it.

            Prints the progress: how many guests have been let go of how many, and the required guests kept. --wait \
            answers once every guest to be let go has been let go (at most the introspector's UnhookTimeout and 15 s \
            more). Exit status: 0 drained (or draining, without --wait); 1 still draining after --wait; 3 the broker \
            is not running; 4 permission denied; 5 no answer; 6 no such introspector.
            """)

    @Argument(help: "The introspector's name in the policy ('command-line' for a broker run with --introspector).")
    var introspector: String

    @Flag(help: "Let go of required guests too: they then run unmonitored.")
    var allowUnmonitored = false

    @Flag(help: "Wait until every guest to be let go has been let go (bounded).")
    var wait = false

    @Option(help: "The broker's control socket (its --control-socket).")
    var controlSocket = "/run/kvmi-broker/control.sock"

    @Option(help: "Seconds to wait for the broker's answer (with --wait, at least the drain's bound).")
    var timeout: Double = 60

    func validate() throws {
        guard timeout > 0 && timeout <= 3600 else { throw ValidationError("--timeout must be more than 0 and at most 3600 seconds") }
    }

    func run() throws {
        let request = ControlProtocol.DrainRequest(operation: "drain", introspector: introspector, allowUnmonitored: allowUnmonitored, wait: wait)
        let answer = try drainExchange(request, controlSocket: controlSocket, timeout: timeout, command: "drain")
        print("draining \(escapedForLog(introspector, limit: 64)): \(answer.progress)")
        if wait && answer.done != true { throw ExitCode(1) }
    }
}

/// `kvmi-broker undrain INTROSPECTOR`.
struct UndrainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "undrain", abstract: "End the drain of an introspector: guests are hooked to it again.",
        discussion: """
            Asks the running broker (root only) to end `kvmi-broker drain INTROSPECTOR`: every guest the policy gives \
            it is hooked to it again, as after a policy reload. Audit-logged. Exit status: 0 done; 3 the broker is \
            not running; 4 permission denied; 5 no answer; 6 the introspector is not draining.
            """)

    @Argument(help: "The introspector's name.")
    var introspector: String

    @Option(help: "The broker's control socket (its --control-socket).")
    var controlSocket = "/run/kvmi-broker/control.sock"

    @Option(help: "Seconds to wait for the broker's answer.")
    var timeout: Double = 10

    func validate() throws {
        guard timeout > 0 && timeout <= 3600 else { throw ValidationError("--timeout must be more than 0 and at most 3600 seconds") }
    }

    func run() throws {
        let request = ControlProtocol.DrainRequest(operation: "undrain", introspector: introspector)
        _ = try drainExchange(request, controlSocket: controlSocket, timeout: timeout, command: "undrain")
        print("\(escapedForLog(introspector, limit: 64)) is no longer draining")
    }
}

/// Sends a drain or undrain request; prints a failure on stderr and exits with its code.
func drainExchange(_ request: ControlProtocol.DrainRequest, controlSocket: String, timeout: Double, command: String) throws
    -> ControlProtocol.DrainAnswer
{
    do {
        guard let body = try? JSONEncoder().encode(request) else { throw Failure(message: "cannot encode the request", code: 5) }
        let reply = try exchange(body, with: controlSocket, timeout: timeout, maximumAnswer: ControlProtocol.maximumLine) {
            controlSocketFailure($0, controlSocket, whoMay: "only root may drain introspectors")
        }
        guard let answer = try? JSONDecoder().decode(ControlProtocol.DrainAnswer.self, from: Data(reply)) else {
            throw Failure(message: "the broker answered something this kvmi-broker (\(BrokerVersion.string)) does not understand", code: 5)
        }
        if let error = answer.error {
            let message = escapedForLog(error, limit: 512)
            switch answer.code {
            case "unknown-introspector", "not-draining": throw Failure(message: message, code: 6)
            case "permission-denied": throw Failure(message: message, code: 4)
            default: throw Failure(message: message, code: 5)
            }
        }
        return answer
    } catch let failure as Failure {
        FileHandle.standardError.write(Data("kvmi-broker \(command): \(failure.message)\n".utf8))
        throw ExitCode(failure.code)
    }
}
