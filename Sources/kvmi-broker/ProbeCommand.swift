import ArgumentParser
import Foundation
import KVMIBrokerCore
import KVMIBrokerOS

#if canImport(Glibc)
    import Glibc
#endif

/// `kvmi-broker probe`: one handshake exactly as QEMU would do it, for introspector vendors.
struct ProbeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "probe",
        abstract: "Perform one QEMU-side handshake with an introspector endpoint and report what happened.",
        discussion: """
            ENDPOINT is unix:/path, vsock:CID:PORT or tcp:ADDRESS:PORT (IPv6 in brackets). The identity is made up \
            unless --uuid and --name are given. Exit status 0 means the handshake completed (and, with \
            --secret-file, the tool's cookie hash matched the secret); 1 that it did not, with the reason on stderr.
            """)

    @Argument(help: "The introspector endpoint.")
    var endpoint: String

    @Option(help: "Shared secret file; the cookie is the SHA-1 of its exact bytes. Without it any cookie is accepted.")
    var secretFile: String?

    @Option(help: "ABI generation: v7 (96-byte struct) or v12 (104 bytes, with max_gpa).")
    var abi: String = "v12"

    @Option(help: "Guest UUID to announce.")
    var uuid: String?

    @Option(help: "Guest name to announce.")
    var name: String = "kvmi-broker-probe"

    @Option(help: "Seconds allowed for connect + handshake.")
    var timeout: Double = 10

    func validate() throws {
        guard ABIGeneration(parsing: abi) != nil else { throw ValidationError("--abi must be v7 or v12, not '\(abi)'") }
        if let uuid, GuestUUID(uuid) == nil { throw ValidationError("--uuid '\(uuid)' is not a UUID like 6695eb01-f6a4-8304-79aa-97f2502e193f") }
        guard timeout > 0, timeout <= 3600 else { throw ValidationError("--timeout must be more than 0 and at most 3600 seconds") }
    }

    func run() async throws {
        let generation = ABIGeneration(parsing: abi)!
        do {
            let target = try IntrospectorEndpoint(parsing: endpoint)
            let secret = try secretFile.map { try SecretFile.load($0) }
            var generator = SystemRandomNumberGenerator()
            let request = HandshakeRequest(
                uuid: uuid.flatMap(GuestUUID.init) ?? .random(using: &generator),
                name: name,
                startTime: Int64(Date().timeIntervalSince1970),
                maxGPA: 0x8000_0000)
            print("probe \(target), ABI \(generation)")
            let outcome = try await IntrospectorConnector().connectAndHandshake(
                to: target,
                HandshakeParameters(
                    abi: generation, request: request, expectedCookie: secret.map { CookieHash(secret: $0) },
                    timeout: .milliseconds(Int64(timeout * 1000))))
            defer { outcome.descriptor.close() }
            print("  connected in \(format(outcome.connectDuration))")
            let gpa = generation == .v12 ? String(format: " max_gpa=0x%llx", request.maxGPA) : ""
            print("  sent \(outcome.bytesSent) bytes: uuid=\(request.uuid) name=\"\(request.name)\" start_time=\(request.startTime)\(gpa)")
            print("  received \(outcome.reply.structSize) bytes (struct_size \(outcome.reply.structSize))")
            if let secretFile, let secret {
                print("  cookie accepted (SHA-1 of \(secretFile), \(secret.count) bytes)")
            } else {
                print("  cookie not checked: no --secret-file, so any hash is accepted (the tool is not authenticated)")
            }
            print("  handshake took \(format(outcome.handshakeDuration)) after connecting")
            print("  \(describeQueuedBytes(outcome.descriptor.raw))")
            print("ok: \(target) completed the handshake")
        } catch let error as BrokerError {
            FileHandle.standardError.write(Data("kvmi-broker probe: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}

/// What the tool already queued behind its reply, looked at without consuming it: with a real
/// QEMU those bytes go to KVM, so a vendor sees whether the tool spoke KVMI first as libkvmi does.
func describeQueuedBytes(_ fd: Int32) -> String {
    usleep(20_000)  // give a tool that writes its first message separately a moment
    var buffer = [UInt8](repeating: 0, count: 4096)
    let count = recv(fd, &buffer, buffer.count, Int32(MSG_PEEK | MSG_DONTWAIT))
    guard count > 0 else { return "nothing queued behind the reply" }
    var text = "\(count)\(count == buffer.count ? "+" : "") bytes queued behind the reply, left unread (they belong to KVM)"
    if count >= 8 {
        let id = buffer.read(UInt16.self, at: 0, order: .host)
        let size = buffer.read(UInt16.self, at: 2, order: .host)
        let seq = buffer.read(UInt32.self, at: 4, order: .host)
        text += ": first KVMI header id=\(id)\(id == 2 ? " (KVMI_GET_VERSION)" : "") size=\(size) seq=\(seq)"
    }
    return text
}
