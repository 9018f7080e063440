import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import KVMITestIntrospector
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// A private directory (0700) for this test process's sockets: the broker refuses to put its
/// sockets in a directory others may write, such as /tmp itself.
let privateSocketDirectory: String = {
    let path = "/tmp/kvmib-test-\(getpid())"
    mkdir(path, 0o700)
    chmod(path, 0o700)
    return path
}()

/// A fresh unix socket path for one test.
func temporarySocketPath(_ tag: String) -> String {
    "\(privateSocketDirectory)/\(tag)-\(UInt32.random(in: 0...UInt32.max)).sock"
}

/// Polls until `body` returns true or `timeout` passes; returns the last result. The bound is
/// generous on purpose: a passing run returns at once, and a busy machine must not fail it.
func eventually(timeout: Duration = .seconds(60), _ body: () -> Bool) -> Bool {
    let deadline = ContinuousClock.now.advanced(by: timeout)
    while ContinuousClock.now < deadline {
        if body() { return true }
        usleep(5000)
    }
    return body()
}

/// Copies an executable with the copy opened close-on-exec (`FileManager.copyItem` opens it
/// without): a test that runs alongside others must not let a process they spawn meanwhile
/// inherit a descriptor open for writing on the copy, or exec'ing it fails with ETXTBSY.
func copyExecutable(_ source: String, to destination: String) throws {
    func failure(_ what: String) -> POSIXError {
        let code = errno
        Issue.record("\(what): \(String(cString: strerror(code)))")
        return POSIXError(POSIXErrorCode(rawValue: code) ?? .EIO)
    }
    let input = open(source, O_RDONLY | O_CLOEXEC)
    guard input >= 0 else { throw failure("open \(source)") }
    defer { close(input) }
    let output = open(destination, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o755)
    guard output >= 0 else { throw failure("create \(destination)") }
    defer { close(output) }
    var buffer = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let count = read(input, &buffer, buffer.count)
        if count < 0 && errno == EINTR { continue }
        guard count >= 0 else { throw failure("read \(source)") }
        if count == 0 { return }
        var written = 0
        while written < count {
            let step = buffer.withUnsafeBytes { write(output, $0.baseAddress! + written, count - written) }
            if step < 0 && errno == EINTR { continue }
            guard step > 0 else { throw failure("write \(destination)") }
            written += step
        }
    }
}

/// The folder holding the built executables (next to the test bundle).
func productsDirectory() -> URL {
    let executable = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
    var directory = executable.deletingLastPathComponent()
    // On Linux the runner is <products>/kvmi-brokerPackageTests.xctest (a plain executable).
    if directory.lastPathComponent.hasSuffix(".xctest") { directory = directory.deletingLastPathComponent() }
    return directory
}

/// What a child reads on its standard input.
enum ChildInput {
    case none
    case text(String)
    case file(String)
}

/// Runs a process to completion with a time limit (terminated past it); returns (status,
/// stdout, stderr). The one runner behind the variants below.
func runProcess(_ executable: URL, _ arguments: [String], stdin: ChildInput, timeout: TimeInterval) throws -> (Int32, String, String) {
    let process = Process()
    process.executableURL = executable
    process.arguments = arguments
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    var inputPipe: Pipe?
    var inputFile: FileHandle?
    switch stdin {
    case .none: break
    case .text:
        inputPipe = Pipe()
        process.standardInput = inputPipe
    case .file(let path):
        guard let handle = FileHandle(forReadingAtPath: path) else { throw BrokerError(.io, "cannot open the child's input", at: path) }
        inputFile = handle
        process.standardInput = handle
    }
    try process.run()
    if case .text(let text) = stdin, let inputPipe {
        inputPipe.fileHandleForWriting.write(Data(text.utf8))
        try inputPipe.fileHandleForWriting.close()
    }
    let deadline = Date().addingTimeInterval(timeout)
    while process.isRunning && Date() < deadline { usleep(10_000) }
    if process.isRunning {
        process.terminate()
        while process.isRunning { usleep(10_000) }
    }
    try inputFile?.close()
    let stdout = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    return (process.terminationStatus, stdout, stderr)
}

/// Runs a process to completion with a time limit; returns (status, stdout, stderr).
func runProcess(_ executable: URL, _ arguments: [String], timeout: TimeInterval = 30) throws -> (Int32, String, String) {
    try runProcess(executable, arguments, stdin: .none, timeout: timeout)
}

let testUUID = GuestUUID("6695eb01-f6a4-8304-79aa-97f2502e193f")!
let testSecret = Array("s3cret with a newline\n".utf8)

/// A new file holding `testSecret`, mode 0600 as secret files must be; the caller unlinks it.
func temporarySecretFile(_ tag: String) -> String {
    let path = "/tmp/kvmib-\(tag)-secret-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    _ = FileManager.default.createFile(atPath: path, contents: Data(testSecret))
    chmod(path, 0o600)
    return path
}

func parameters(_ abi: ABIGeneration = .v12, secret: [UInt8]? = testSecret, timeout: Duration = .seconds(2)) -> HandshakeParameters {
    HandshakeParameters(
        abi: abi, request: HandshakeRequest(uuid: testUUID, name: "guest-1", startTime: 1_700_000_000, maxGPA: 0x1_0000_0000),
        expectedCookie: secret.map { CookieHash(secret: $0) }, timeout: timeout)
}

/// Every OS-layer suite nests here and runs one test at a time: the descriptor-leak checks
/// count this process's open descriptors, which a parallel test would disturb.
@Suite(.serialized) enum OSLayerTests {}

/// What each open descriptor is, for leak reports.
func describeDescriptors() -> String {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    return entries.sorted { (Int($0) ?? 0) < (Int($1) ?? 0) }.map { entry in
        "\(entry)=\((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(entry)")) ?? "?")"
    }.joined(separator: " ")
}

/// Lets the runtime create the descriptors it keeps for the life of the process (the reactor,
/// Dispatch's timers, Foundation's process monitor), so that a leak check counts only ours.
func warmUpRuntimeDescriptors() async throws {
    _ = IOReactor.shared
    _ = EndpointWatcher.shared
    _ = try runProcess(URL(fileURLWithPath: "/bin/true"), [])
    try await Task.sleep(for: .milliseconds(400))
}

/// Open sockets of this process: the leak check for tests that also start processes, where the
/// runtime adds descriptors of its own (Dispatch's event loops, Foundation's process monitor).
func openSocketCount() -> Int {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    return entries.filter { ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\($0)")) ?? "").hasPrefix("socket:") }.count
}

/// Runs a process with `input` on its stdin; returns (status, stdout, stderr).
func runProcess(_ executable: URL, _ arguments: [String], input: String, timeout: TimeInterval = 30) throws -> (Int32, String, String) {
    try runProcess(executable, arguments, stdin: .text(input), timeout: timeout)
}
