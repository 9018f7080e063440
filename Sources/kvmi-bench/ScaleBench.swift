import ArgumentParser
import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import KVMITestIntrospector

#if canImport(Glibc)
    import Glibc
#endif

/// A boot storm: N fake QEMUs (Benchmarks/scale/fake_qemu.c, one process per guest, as QEMU is)
/// released at once, first against the C floor (Benchmarks/scale/scale_floor.c: the same socket
/// work in one epoll loop), then against `kvmi-broker run`, each with a fresh test introspector.
/// Every wait is for an event (a record on the guests' pipe) and is bounded by `--timeout`.
struct ScaleBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scale",
        abstract: "Boot storm: N guests connect at once; the broker against a C floor doing the same socket work.",
        discussion: """
            Builds Benchmarks/scale/fake_qemu.c and scale_floor.c with cc into a temporary directory, runs the floor, then \
            kvmi-broker run (both from this build for the broker and kvmi-test-introspector), each with a fresh test \
            introspector and N fake QEMUs released together. Reports, for each: time from release until all N are hooked, \
            per-guest latencies, refusals and lost channels, and the server's memory, threads, descriptors and CPU time.
            """)

    @Option(help: "Guests started at once.")
    var guests = 1000

    @Option(help: "Soft RLIMIT_NOFILE for the broker and the floor (default: inherited), set with prlimit(1).")
    var nofileSoft: Int?

    @Option(help: "Hard RLIMIT_NOFILE for the broker and the floor (default: inherited), set with prlimit(1).")
    var nofileHard: Int?

    @Option(
        help: """
            The test introspector: normal (backlog 1024, one thread accepting and answering) or serial (as libkvmi: \
            backlog 0, the next accept only after this guest's GET_VERSION round trip through the hooked descriptor).
            """)
    var introspector = "normal"

    @Option(
        name: .customLong("broker-option"), parsing: .singleValue,
        help: "An extra option for `kvmi-broker run` (repeatable), e.g. --broker-option=--handshakes-per-introspector=32.")
    var brokerOptions: [String] = []

    @Option(help: "Floor + broker pairs to run. With more than one, a summary follows: the medians and in how many runs each bar held.")
    var runs = 1

    @Option(help: "Seconds allowed for each wait (start-up, all hooked, the guests' exit).")
    var timeout: Double = 180

    @Option(help: "The directory with fake_qemu.c and scale_floor.c (default: Benchmarks/scale above the current directory or this executable).")
    var sources: String?

    @Flag(
        help: """
            Also print, for both, how many guests reached WELCOME and how many were hooked in each tenth of the storm: \
            a throughput-bound storm finishes guests evenly, a latency-bound one leaves a tail.
            """)
    var timeline = false

    @Flag(help: "Keep the work directory (the servers', introspectors' and launchers' logs) instead of removing it.")
    var keepLogs = false

    @Option(
        help: """
            The floor's peer check: basic (the issue's floor: SO_PEERCRED, /proc/PID/exe's path, the -uuid in \
            /proc/PID/cmdline) or broker (the broker's whole check: the peer pinned by SO_PEERPIDFD, the executable's \
            device and inode before and after the command line, the re-check before HOOK), to tell what the broker's \
            identity check costs from what the rest of the broker costs.
            """)
    var floorIdentity = "basic"

    func validate() throws {
        guard guests >= 1 else { throw ValidationError("--guests must be at least 1") }
        guard runs >= 1 else { throw ValidationError("--runs must be at least 1") }
        guard introspector == "normal" || introspector == "serial" else { throw ValidationError("--introspector must be normal or serial") }
        guard floorIdentity == "basic" || floorIdentity == "broker" else { throw ValidationError("--floor-identity must be basic or broker") }
        if let nofileSoft, nofileSoft < 16 { throw ValidationError("--nofile-soft must be at least 16") }
        if let nofileHard, nofileHard < max(16, nofileSoft ?? 16) { throw ValidationError("--nofile-hard must be at least 16 and --nofile-soft") }
        guard timeout > 0 else { throw ValidationError("--timeout must be positive") }
    }

    func run() throws {
        try installInterruptHandler()
        let binDirectory = (executablePath() as NSString).deletingLastPathComponent
        let broker = "\(binDirectory)/kvmi-broker"
        let testIntrospector = "\(binDirectory)/kvmi-test-introspector"
        for binary in [broker, testIntrospector] where !FileManager.default.isExecutableFile(atPath: binary) {
            throw ValidationError("\(binary) is missing: build all products (swift build -c release)")
        }
        let sourceDirectory = try findSources(binDirectory: binDirectory)
        var template = Array("/tmp/kvmi-scale.XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw BrokerError(.io, "mkdtemp failed", errno: errno) }
        let work = String(cString: made)
        defer {
            if keepLogs { print("logs kept in \(work)") } else { try? FileManager.default.removeItem(atPath: work) }
        }

        for program in ["fake_qemu", "scale_floor"] {
            try compile("\(sourceDirectory)/\(program).c", to: "\(work)/\(program)", log: "\(work)/cc-\(program).log")
        }
        let fakeQEMU = URL(fileURLWithPath: "\(work)/fake_qemu").resolvingSymlinksInPath().path
        let secret = Array("scale benchmark secret\n".utf8)
        let secretPath = "\(work)/secret"
        guard FileManager.default.createFile(atPath: secretPath, contents: Data(secret), attributes: [.posixPermissions: 0o600]) else {
            throw BrokerError(.io, "cannot write the secret", at: secretPath)
        }
        let cookieHex = CookieHash(secret: secret).description

        // The launcher and the test introspector hold a descriptor or more per guest: raise our limit
        // (inherited by them) to the hard one. The servers get exactly --nofile-soft when given.
        var limit = rlimit()
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        limit.rlim_cur = limit.rlim_max
        setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        let serverHard = nofileHard.map { min(rlim_t($0), limit.rlim_max) } ?? limit.rlim_max
        let serverSoft = nofileSoft.map { min(rlim_t($0), serverHard) } ?? min(limit.rlim_cur, serverHard)
        var wrapper: [String] = []
        if nofileSoft != nil || nofileHard != nil {
            guard let prlimit = lookUp("prlimit") else { throw ValidationError("--nofile-soft/--nofile-hard need prlimit(1) (util-linux)") }
            wrapper = [prlimit, "--nofile=\(serverSoft):\(serverHard)", "--"]
        }

        let serial = introspector == "serial"
        print(
            "kvmi-bench scale: \(guests) fake QEMUs released at once; ABI v12, commands and events all; introspector \(introspector) "
                + (serial ? "(backlog 0, one guest at a time up to its GET_VERSION reply)" : "(backlog 1024)"))
        print(
            "servers started with RLIMIT_NOFILE soft \(serverSoft), hard \(serverHard)\(wrapper.isEmpty ? "" : " (prlimit)"); "
                + "launcher and test introspector \(limit.rlim_cur)")
        print("kvmi-broker \(BrokerVersion.string): fake QEMU \(fakeQEMU); broker \(broker)")
        let floorArguments = floorIdentity == "broker" ? ["--broker-identity"] : []
        print("floor's peer check: \(floorIdentity == "broker" ? "the broker's (--floor-identity broker)" : "basic")")
        let storm = Storm(
            guests: guests, work: work, fakeQEMU: fakeQEMU, testIntrospector: testIntrospector, serial: serial, secretPath: secretPath,
            timeout: .milliseconds(Int64(timeout * 1000)), wrapper: wrapper)
        var series = StormSeries()
        for run in 1...runs {
            let floor = try storm.run(
                name: "floor", run: run,
                command: { channel, tool in ("\(work)/scale_floor", [channel, tool, cookieHex, fakeQEMU] + floorArguments) })
            let brokerResult = try storm.run(
                name: "broker", run: run,
                command: { channel, tool in
                    (
                        broker,
                        [
                            // As the broker ships: no status file (`--broker-option --status-file=PATH` adds it).
                            "run", "--channel-socket", channel, "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--control-socket", "",
                            "--introspector", "unix:\(tool)", "--secret-file", secretPath, "--emulator", fakeQEMU,
                            "--abi", "v12", "--commands", "all", "--events", "all", "--log-level", "warning",
                        ] + brokerOptions
                    )
                })
            print("")
            print("run \(run) of \(runs)")
            let report = Report(floor: floor, broker: brokerResult, guests: guests, timeline: timeline)
            report.print()
            series.append(report.seriesRun)
        }
        if runs > 1 {
            print("")
            for line in series.lines() { print(line) }
        }
    }

    private func findSources(binDirectory: String) throws -> String {
        if let sources { return sources }
        var candidates: [String] = []
        for start in [FileManager.default.currentDirectoryPath, binDirectory] {
            var directory = start
            while directory != "/" && !directory.isEmpty {
                candidates.append("\(directory)/Benchmarks/scale")
                directory = (directory as NSString).deletingLastPathComponent
            }
        }
        guard let found = candidates.first(where: { FileManager.default.fileExists(atPath: "\($0)/fake_qemu.c") }) else {
            throw ValidationError("cannot find Benchmarks/scale/fake_qemu.c; pass --sources")
        }
        return found
    }

    private func compile(_ source: String, to output: String, log: String) throws {
        guard let cc = lookUp("cc") else { throw ValidationError("no C compiler (cc) on PATH") }
        let process = try SpawnedProcess(cc, ["-O2", "-Wall", "-Wextra", "-Werror", "-o", output, source], logPath: log)
        guard process.wait(timeout: 120) == 0 else {
            throw BrokerError(.io, "cc failed for \(source): \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
        }
    }
}

// MARK: - One storm against one server

/// One fixed-size record from a fake QEMU or its launcher (`struct fq_record` in fake_qemu.c).
private struct GuestRecord {
    enum Kind: UInt32 {
        case ready = 1, hooked, refused, closed, failed, kvmi, toolHangup
        case launched = 16, reaped
    }

    static let size = 80
    static let magic: UInt32 = 0x5251_4B46

    var kind: Kind
    var index: Int
    var pid: Int32
    var value: Int32
    var tConnect: UInt64
    var tHello: UInt64
    var tWelcome: UInt64
    var tHook: UInt64
    var tResult: UInt64

    init?(_ bytes: ArraySlice<UInt8>) {
        let raw = Array(bytes)
        guard raw.read(UInt32.self, at: 0, order: .host) == Self.magic, let kind = Kind(rawValue: raw.read(UInt32.self, at: 4, order: .host)) else {
            return nil
        }
        self.kind = kind
        index = Int(raw.read(UInt32.self, at: 8, order: .host))
        pid = raw.read(Int32.self, at: 12, order: .host)
        value = raw.read(Int32.self, at: 16, order: .host)
        tConnect = raw.read(UInt64.self, at: 32, order: .host)
        tHello = raw.read(UInt64.self, at: 40, order: .host)
        tWelcome = raw.read(UInt64.self, at: 48, order: .host)
        tHook = raw.read(UInt64.self, at: 56, order: .host)
        tResult = raw.read(UInt64.self, at: 64, order: .host)
    }
}

/// The machine's CPU time counters (the `cpu` line of /proc/stat), for the steal time: on a
/// virtual machine whose host is busy, the hypervisor runs other work on our CPUs, and the
/// broker's many short hand-overs suffer from it more than the floor's one loop.
private struct MachineCPU {
    var total: Double
    var steal: Double
    /// Idle and waiting for I/O: what nobody used.
    var idle: Double

    init?() {
        guard let stat = readProcFile("/proc/stat"), let line = stat.split(separator: "\n").first, line.hasPrefix("cpu ") else { return nil }
        let fields = line.split(separator: " ").dropFirst().compactMap { Double($0) }
        guard fields.count >= 8 else { return nil }
        total = fields.prefix(8).reduce(0, +)
        steal = fields[7]
        idle = fields[3] + fields[4]
    }

    /// The share of the machine's CPU time that was used (by anything, this VM's own work):
    /// near 100 % means the storm was bound by the CPU, not by waiting.
    func busyPercent(since earlier: MachineCPU) -> Double? {
        total > earlier.total ? 100 - 100 * (idle - earlier.idle) / (total - earlier.total) : nil
    }

    func stealPercent(since earlier: MachineCPU) -> Double? {
        total > earlier.total ? 100 * (steal - earlier.steal) / (total - earlier.total) : nil
    }
}

/// A process's CPU time (utime + stime of /proc/PID/stat), in seconds.
private func cpuSeconds(stat: String) -> Double? {
    guard let closing = stat.lastIndex(of: ")") else { return nil }
    // Fields after "comm)": state is field 3, utime 14, stime 15.
    let fields = stat[stat.index(after: closing)...].split(separator: " ")
    guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return nil }
    return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
}

/// Each thread of a process: the first two fields of `/proc/PID/task/TID/schedstat`, seconds on a
/// CPU and seconds runnable but waiting for one, to the nanosecond (the clock ticks of
/// /proc/PID/stat round a fake QEMU's few milliseconds to zero); nil once the process is gone.
private func threadTimes(of pid: pid_t) -> [(tid: String, running: Double, waiting: Double)]? {
    guard let threads = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task") else { return nil }
    return threads.compactMap { tid in
        guard let line = readProcFile("/proc/\(pid)/task/\(tid)/schedstat") else { return nil }
        let fields = line.split(separator: " ").compactMap { UInt64($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        guard fields.count >= 2 else { return nil }
        return (tid, Double(fields[0]) / 1e9, Double(fields[1]) / 1e9)
    }
}

/// A process's time on a CPU so far, in seconds (all its threads); nil once it is gone.
private func preciseCPUSeconds(of pid: pid_t) -> Double? {
    threadTimes(of: pid).map { $0.reduce(0) { $0 + $1.running } }
}

/// A process's threads by name (`comm`): seconds on a CPU and seconds waiting for one.
private func cpuSecondsByThread(of pid: pid_t) -> [String: (running: Double, waiting: Double)] {
    var seconds: [String: (running: Double, waiting: Double)] = [:]
    for thread in threadTimes(of: pid) ?? [] {
        let name = readProcFile("/proc/\(pid)/task/\(thread.tid)/comm")?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
        let sum = seconds[name, default: (0, 0)]
        seconds[name] = (sum.running + thread.running, sum.waiting + thread.waiting)
    }
    return seconds
}

/// The peers' CPU time during the storm: the test introspector and the fake QEMUs, read before
/// the release and once all are finished. The same peers do the same work on both sides, so a
/// difference is work the server made them do (more wake-ups, retried connects).
private struct PeerCPU {
    var introspector: Double
    var guests: Double

    init?(introspector: pid_t, guests: [Int32]) {
        guard let tool = preciseCPUSeconds(of: introspector) else { return nil }
        var sum = 0.0
        for pid in guests {
            guard let seconds = preciseCPUSeconds(of: pid) else { return nil }
            sum += seconds
        }
        self.introspector = tool
        self.guests = sum
    }
}

/// A server process's footprint from /proc.
private struct ProcessSample {
    var rssKiB: Int
    var highWaterKiB: Int
    var threads: Int
    /// The threads' names (`/proc/PID/task/TID/comm`), counted: which threads make the count.
    var threadNames: String
    var descriptors: Int
    var cpuSeconds: Double

    init?(pid: pid_t) {
        guard let status = readProcFile("/proc/\(pid)/status"), let stat = readProcFile("/proc/\(pid)/stat") else { return nil }
        func field(_ name: String) -> Int {
            guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix(name + ":") }) else { return -1 }
            return Int(line.dropFirst(name.count + 1).split(whereSeparator: { $0 == " " || $0 == "\t" }).first ?? "") ?? -1
        }
        rssKiB = field("VmRSS")
        highWaterKiB = field("VmHWM")
        threads = field("Threads")
        var names: [String: Int] = [:]
        for task in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? [] {
            let comm = readProcFile("/proc/\(pid)/task/\(task)/comm")?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
            names[comm, default: 0] += 1
        }
        threadNames = names.sorted { $0.key < $1.key }.map { $0.value == 1 ? $0.key : "\($0.key) x\($0.value)" }.joined(separator: ", ")
        descriptors = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
        guard let seconds = kvmi_bench.cpuSeconds(stat: stat) else { return nil }
        cpuSeconds = seconds
    }
}

/// What one storm measured.
private struct StormResult {
    var name: String
    var launched = 0
    var hooked: [Int: GuestRecord] = [:]
    var refused: [Int: Int32] = [:]
    var lost: Set<Int> = []
    var connectFailures = 0
    var kvmiAnswered = 0
    var toolHangups = 0
    var reaped = 0
    var reapedNonZero = 0
    var releasedAt: UInt64 = 0
    /// The share of the machine's CPU time the hypervisor gave to others during the storm (steal).
    var stealPercent: Double?
    /// The share of the machine's CPU time used during the storm (by anything).
    var busyPercent: Double?
    /// The peers' CPU seconds during the storm (introspector, fake QEMUs).
    var peerCPU: (introspector: Double, guests: Double)?
    /// The server's threads during the storm by name (those that ran, most first): seconds on a
    /// CPU and seconds runnable but waiting for one.
    var threadCPU: [(name: String, running: Double, waiting: Double)] = []
    /// Set when a wait ran out (what was not reached).
    var unfinished: String?
    var baseline: ProcessSample?
    var live: ProcessSample?
    var after: ProcessSample?
    var limits = ""
    var notes: [String] = []

    var finished: Int { Set(hooked.keys).union(refused.keys).union(lost).count }

    mutating func apply(_ record: GuestRecord) {
        switch record.kind {
        case .ready: break
        case .hooked: hooked[record.index] = record
        case .refused: refused[record.index] = record.value
        case .closed: lost.insert(record.index)
        case .failed: connectFailures += 1
        case .kvmi: kvmiAnswered += 1
        case .toolHangup: toolHangups += 1
        case .launched: launched = Int(record.value)
        case .reaped:
            reaped = Int(record.value)
            reapedNonZero = record.index
        }
    }
}

private final class Storm {
    let guests: Int
    let work: String
    let fakeQEMU: String
    let testIntrospector: String
    let serial: Bool
    let secretPath: String
    let timeout: Duration
    /// `prlimit --nofile=SOFT:HARD --` when the servers get their own descriptor limits (its exec keeps the pid).
    let wrapper: [String]

    init(
        guests: Int, work: String, fakeQEMU: String, testIntrospector: String, serial: Bool, secretPath: String, timeout: Duration,
        wrapper: [String]
    ) {
        self.guests = guests
        self.work = work
        self.fakeQEMU = fakeQEMU
        self.testIntrospector = testIntrospector
        self.serial = serial
        self.secretPath = secretPath
        self.timeout = timeout
        self.wrapper = wrapper
    }

    func run(name: String, run: Int, command: (_ channel: String, _ tool: String) -> (String, [String])) throws -> StormResult {
        var result = StormResult(name: name)
        let tag = "\(name)-\(run)"
        let toolSocket = "\(work)/tool-\(tag).sock"
        let channelSocket = "\(work)/channel-\(tag).sock"

        let tool = try SpawnedProcess(
            testIntrospector,
            ["--listen", "unix:\(toolSocket)", "--secret-file", secretPath, "--send-get-version", "--quiet"] + (serial ? ["--serial"] : []),
            logPath: "\(work)/introspector-\(tag).log")
        defer { tool.terminate() }
        try waitForSocket(toolSocket, of: tool, what: "the test introspector")

        let (executable, arguments) = command(channelSocket, toolSocket)
        let server =
            wrapper.isEmpty
            ? try SpawnedProcess(executable, arguments, logPath: "\(work)/\(tag).log")
            : try SpawnedProcess(wrapper[0], Array(wrapper.dropFirst()) + [executable] + arguments, logPath: "\(work)/\(tag).log")
        defer { server.terminate() }
        try waitForSocket(channelSocket, of: server, what: name)
        result.limits =
            readProcFile("/proc/\(server.pid)/limits")?.split(separator: "\n").first { $0.hasPrefix("Max open files") }
            .map { $0.split(separator: " ", omittingEmptySubsequences: true).dropFirst(3).prefix(2).joined(separator: "/") } ?? "?"
        result.baseline = settledSample(server.pid, towards: nil)

        // The guests' pipes: records (they write), stop and go (they read; end of file is the signal).
        let records = try makePipe()
        let stop = try makePipe()
        let go = try makePipe()
        _ = fcntl(records.read, 1031, 1 << 20)  // F_SETPIPE_SZ: room for every guest's records
        let launcher = try Launcher(
            fakeQEMU, ["--launch", "\(guests)", "--channel", channelSocket, "--record-fd", "3", "--stop-fd", "4", "--go-fd", "5"],
            descriptors: [records.write, stop.read, go.read], logPath: "\(work)/launcher-\(tag).log")
        defer { launcher.kill() }
        close(records.write)
        close(stop.read)
        close(go.read)
        var stopWrite: Int32? = stop.write
        defer { if let fd = stopWrite { close(fd) } }
        let reader = RecordReader(fd: records.read)
        defer { close(records.read) }

        // Every guest started and blocked on the go pipe.
        var ready = 0
        var guestPIDs: [Int32] = []
        var end = try reader.pump(until: .now.advanced(by: timeout)) { record in
            result.apply(record)
            if record.kind == .ready {
                ready += 1
                guestPIDs.append(record.pid)
            }
            return result.launched > 0 && ready >= result.launched
        }
        if end != .done {
            close(go.write)
            result.unfinished = "only \(ready) of \(guests) fake QEMUs started (\(end))"
        } else {
            // The storm. The samples before it are read first: reading a thousand guests' counters
            // takes milliseconds, which must not count as the storm's.
            let peersBefore = PeerCPU(introspector: tool.pid, guests: guestPIDs)
            let threadsBefore = cpuSecondsByThread(of: server.pid)
            let cpuBefore = MachineCPU()
            var now = timespec()
            clock_gettime(CLOCK_MONOTONIC, &now)
            result.releasedAt = UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
            close(go.write)
            end = try reader.pump(until: .now.advanced(by: timeout)) { record in
                result.apply(record)
                return result.finished >= result.launched
            }
            if let before = cpuBefore, let after = MachineCPU() {
                result.stealPercent = after.stealPercent(since: before)
                result.busyPercent = after.busyPercent(since: before)
            }
            if let before = peersBefore, let after = PeerCPU(introspector: tool.pid, guests: guestPIDs) {
                result.peerCPU = (after.introspector - before.introspector, after.guests - before.guests)
            }
            result.threadCPU = cpuSecondsByThread(of: server.pid).map { name, after in
                let before = threadsBefore[name] ?? (0, 0)
                return (name, after.running - before.running, after.waiting - before.waiting)
            }.filter { $0.running >= 0.0005 }.sorted { $0.running > $1.running }
            if end != .done {
                result.unfinished = "did not finish: \(result.hooked.count) of \(result.launched) hooked (\(end))"
            } else if result.kvmiAnswered < result.hooked.count {
                // The tool's first KVMI message through each hooked descriptor (bounded, as libkvmi's 15 s).
                _ = try reader.pump(until: .now.advanced(by: .seconds(15))) { record in
                    result.apply(record)
                    return result.kvmiAnswered >= result.hooked.count
                }
            }
        }
        // Settled: a server preempted between sending HOOK and closing its copy of the fd still holds it for a moment.
        result.live = settledSample(server.pid, towards: nil)

        // The guests exit; the launcher reaps them all and says so.
        close(stop.write)
        stopWrite = nil
        end = try reader.pump(until: .now.advanced(by: timeout)) { record in
            result.apply(record)
            return record.kind == .reaped
        }
        if end != .done { result.notes.append("the launcher did not report its guests reaped (\(end)); killed") }
        if !launcher.reap(until: .now.advanced(by: .seconds(30))) { result.notes.append("the launcher did not exit; killed") }
        result.after = settledSample(server.pid, towards: result.baseline?.descriptors)

        if !server.isRunning {
            result.notes.append("exited by itself during the run (status \(server.wait(timeout: 0).map(String.init) ?? "?")); see its log")
        }
        kill(server.pid, SIGTERM)
        let signalled = ContinuousClock.now
        if let status = server.wait(timeout: 10) {
            result.notes.append("exited with status \(status) \(format(signalled.duration(to: .now))) after SIGTERM")
        } else {
            result.notes.append("still running 10 s after SIGTERM; killed")
            server.terminate(SIGKILL)
        }
        tool.terminate()
        let log = (try? String(contentsOfFile: server.logPath, encoding: .utf8)) ?? ""
        let lines = log.split(separator: "\n").map(String.init)
        if name == "floor" {
            result.notes += lines.filter { $0.hasPrefix("scale_floor:") }
        } else if !lines.isEmpty {
            // The messages without their metadata, numbers and this run's paths, most frequent first.
            let messages = lines.map { line -> String in
                let message = line.range(of: "] ", options: .backwards).map { String(line[$0.upperBound...]) } ?? line
                return message.replacingOccurrences(of: work, with: "WORK").replacingOccurrences(
                    of: "[0-9]+", with: "N", options: .regularExpression)
            }
            let counts = Dictionary(grouping: messages, by: { $0 }).mapValues(\.count).sorted { $0.value > $1.value }
            result.notes.append("\(name) log: \(lines.count) lines at --log-level warning; most frequent messages:")
            result.notes += counts.prefix(5).map { "  \($0.value) x \(String($0.key.prefix(200)))" }
        }
        return result
    }

    private func waitForSocket(_ path: String, of process: SpawnedProcess, what: String) throws {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while ContinuousClock.now < deadline {
            var status = stat()
            if lstat(path, &status) == 0 && status.st_mode & S_IFMT == S_IFSOCK { return }
            guard process.isRunning else { throw BrokerError(.io, "\(what) exited at start-up: \(process.log)") }
            try checkInterrupt()
            usleep(5_000)
        }
        throw BrokerError(.timedOut, "\(what) did not create \(path)")
    }

    /// Samples once the descriptor count has stopped changing (or reached `target`), bounded.
    private func settledSample(_ pid: pid_t, towards target: Int?) -> ProcessSample? {
        let deadline = ContinuousClock.now.advanced(by: .seconds(30))
        var last = ProcessSample(pid: pid)
        var stableSince = ContinuousClock.now
        while ContinuousClock.now < deadline {
            usleep(100_000)
            guard let sample = ProcessSample(pid: pid) else { return last }
            if let target, sample.descriptors <= target { return sample }
            if sample.descriptors != last?.descriptors || sample.threads != last?.threads { stableSince = .now }
            last = sample
            if stableSince.duration(to: .now) >= .seconds(target == nil ? 0.5 : 2) { break }
        }
        return last
    }
}

/// The guests' launcher (`fake_qemu --launch`), in a process group of its own so that nothing
/// it started can be left behind.
private final class Launcher {
    private let process: SpawnedProcess
    var pid: pid_t { process.pid }

    init(_ executable: String, _ arguments: [String], descriptors: [Int32], logPath: String) throws {
        process = try SpawnedProcess(executable, arguments, logPath: logPath, descriptors: descriptors, ownProcessGroup: true)
    }

    /// Waits for the launcher's exit; false if it had to be killed.
    func reap(until deadline: ContinuousClock.Instant) -> Bool {
        while process.isRunning && ContinuousClock.now < deadline { usleep(5_000) }
        let exited = !process.isRunning
        // Guests orphaned by a killed launcher die with it (PR_SET_PDEATHSIG) or on the stop pipe.
        if !exited { kill() }
        return exited
    }

    /// SIGKILL to the whole group (the launcher and every guest), then reaps the launcher.
    func kill() {
        guard process.isRunning else { return }
        Glibc.kill(-process.pid, SIGKILL)
        process.terminate(SIGKILL, grace: 0)
    }

    deinit { kill() }
}

/// Reads fixed-size records from the guests' pipe.
private final class RecordReader {
    enum End: Equatable, CustomStringConvertible {
        case done, timedOut, endOfFile

        var description: String {
            switch self {
            case .done: return "done"
            case .timedOut: return "timed out"
            case .endOfFile: return "every fake QEMU exited"
            }
        }
    }

    let fd: Int32
    private var buffer: [UInt8] = []
    private var atEnd = false

    init(fd: Int32) { self.fd = fd }

    /// Applies records until `handle` returns true, the deadline passes or every writer is gone.
    func pump(until deadline: ContinuousClock.Instant, _ handle: (GuestRecord) -> Bool) throws -> End {
        while true {
            while buffer.count >= GuestRecord.size {
                let record = GuestRecord(buffer[0..<GuestRecord.size])
                buffer.removeFirst(GuestRecord.size)
                if let record, handle(record) { return .done }
            }
            if atEnd { return .endOfFile }
            let remaining = ContinuousClock.now.duration(to: deadline)
            guard remaining > .zero else { return .timedOut }
            var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: interruptPipe.read, events: Int16(POLLIN), revents: 0)]
            let ready = poll(&fds, 2, Int32(min(1000, max(1, remaining.millisecondsDouble.rounded(.up)))))
            if ready < 0 && errno != EINTR { throw BrokerError(.io, "poll failed", errno: errno) }
            try checkInterrupt()
            guard ready > 0, fds[0].revents != 0 else { continue }
            var chunk = [UInt8](repeating: 0, count: 64 * GuestRecord.size)
            let count = read(fd, &chunk, chunk.count)
            if count > 0 {
                buffer += chunk.prefix(count)
            } else if count == 0 {
                atEnd = true
            } else if errno != EINTR && errno != EAGAIN {
                throw BrokerError(.io, "cannot read the guests' records", errno: errno)
            }
        }
    }
}

// MARK: - The report

private struct Report {
    let floor: StormResult
    let broker: StormResult
    let guests: Int
    let timeline: Bool

    func print() {
        func row(_ label: String, _ floorCell: String, _ brokerCell: String, _ ratio: String = "") {
            Swift.print(pad(label, 42) + pad(floorCell, 38) + pad(brokerCell, 38) + ratio)
        }
        row("", "floor (C, one epoll loop)", "broker")
        let allHooked = [floor, broker].map(allHookedSeconds)
        row(
            "release -> all hooked", cell(floor, allHooked[0]), cell(broker, allHooked[1]),
            ratio(allHooked[0], allHooked[1]))
        for (label, metric) in latencyMetrics {
            let values = [floor, broker].map { percentiles(metric($0)) }
            row(
                label + " p50/p99/max", values[0].map(triple) ?? "-", values[1].map(triple) ?? "-",
                values[0] != nil && values[1] != nil ? "p50 \(ratio(values[0]?.0, values[1]?.0))  p99 \(ratio(values[0]?.1, values[1]?.1))" : "")
        }
        row("hooked", "\(floor.hooked.count) of \(floor.launched)", "\(broker.hooked.count) of \(broker.launched)")
        row("REFUSE / channel lost", "\(floor.refused.count) / \(floor.lost.count)", "\(broker.refused.count) / \(broker.lost.count)")
        row("connect failures (retried)", "\(floor.connectFailures)", "\(broker.connectFailures)")
        row("GET_VERSION answered via the fd", "\(floor.kvmiAnswered)", "\(broker.kvmiAnswered)")
        row("server RLIMIT_NOFILE in effect soft/hard", floor.limits, broker.limits)
        func samples(_ result: StormResult, _ value: (ProcessSample) -> String) -> String {
            [result.baseline, result.live, result.after].map { $0.map(value) ?? "?" }.joined(separator: " / ")
        }
        let mib = { (kib: Int) in String(format: "%.1f", Double(kib) / 1024) }
        row("RSS MiB baseline / live / after", samples(floor) { mib($0.rssKiB) }, samples(broker) { mib($0.rssKiB) })
        row(
            "RSS high-water MiB (after)", floor.after.map { mib($0.highWaterKiB) } ?? "?", broker.after.map { mib($0.highWaterKiB) } ?? "?",
            ratio(floor.after.map { Double($0.highWaterKiB) }, broker.after.map { Double($0.highWaterKiB) }))
        row("threads baseline / live / after", samples(floor) { "\($0.threads)" }, samples(broker) { "\($0.threads)" })
        for result in [floor, broker] {
            if let live = result.live { Swift.print("\(result.name): threads live: \(live.threadNames)") }
        }
        row("descriptors baseline / live / after", samples(floor) { "\($0.descriptors)" }, samples(broker) { "\($0.descriptors)" })
        let perSession = [floor, broker].map { result -> String in
            guard let baseline = result.baseline, let live = result.live, result.launched > 0 else { return "?" }
            return String(format: "%.2f", Double(live.descriptors - baseline.descriptors) / Double(result.launched))
        }
        row("descriptors per live session", perSession[0], perSession[1])
        let cpu = [floor, broker].map { result -> (Double?, Double?) in
            guard let baseline = result.baseline, let live = result.live else { return (nil, result.after?.cpuSeconds) }
            return (live.cpuSeconds - baseline.cpuSeconds, result.after?.cpuSeconds)
        }
        func cpuCell(_ value: (Double?, Double?)) -> String {
            "\(value.0.map { String(format: "%.2f", $0) } ?? "?") / \(value.1.map { String(format: "%.2f", $0) } ?? "?")"
        }
        row("CPU s: storm / whole run", cpuCell(cpu[0]), cpuCell(cpu[1]), "storm \(ratio(cpu[0].0, cpu[1].0))")
        let peers = [floor, broker].map { result in
            result.peerCPU.map { String(format: "%.3f / %.3f", $0.introspector, $0.guests) } ?? "?"
        }
        row("peers' CPU s (storm): tool / fake QEMUs", peers[0], peers[1])
        for result in [floor, broker] where !result.threadCPU.isEmpty {
            let threads = result.threadCPU.map { "\($0.name) \(String(format: "%.3f / %.3f", $0.running, $0.waiting))" }
            Swift.print("\(result.name): threads' s on a CPU / waiting for one (storm): \(threads.joined(separator: ", "))")
        }
        row(
            "machine CPU busy, both cores (storm)", floor.busyPercent.map { String(format: "%.0f %%", $0) } ?? "?",
            broker.busyPercent.map { String(format: "%.0f %%", $0) } ?? "?")
        row(
            "machine CPU stolen by the host (storm)", floor.stealPercent.map { String(format: "%.0f %%", $0) } ?? "?",
            broker.stealPercent.map { String(format: "%.0f %%", $0) } ?? "?")
        if timeline {
            for result in [floor, broker] { printTimeline(result) }
        }
        for result in [floor, broker] {
            if result.reaped != result.launched || result.reapedNonZero != 0 {
                Swift.print(
                    "\(result.name): launcher reaped \(result.reaped) of \(result.launched) fake QEMUs, \(result.reapedNonZero) with a non-zero status"
                )
            }
            if result.toolHangups > 0 { Swift.print("\(result.name): \(result.toolHangups) tool descriptors hung up while hooked") }
            if !result.refused.isEmpty {
                let reasons = Dictionary(grouping: result.refused.values, by: { $0 }).map { "errno \($0.key) x\($0.value.count)" }
                Swift.print("\(result.name): REFUSE reasons: \(reasons.joined(separator: ", "))")
            }
            for note in result.notes { Swift.print("\(result.name): \(note)") }
        }
    }

    private var latencyMetrics: [(String, (StormResult) -> [UInt64])] {
        [
            ("release -> connected", { result in result.hooked.values.map { $0.tConnect &- result.releasedAt } }),
            ("HELLO sent -> WELCOME", { result in result.hooked.values.map { $0.tWelcome &- $0.tHello } }),
            ("HELLO sent -> HOOK received", helloToHook),
        ]
    }

    /// WELCOMEs and hooks in each tenth of the time from release to the last hook.
    private func printTimeline(_ result: StormResult) {
        guard let end = result.hooked.values.map(\.tResult).max(), end > result.releasedAt else { return }
        let span = Double(end &- result.releasedAt)
        func counts(_ time: (GuestRecord) -> UInt64) -> [Int] {
            var bins = [Int](repeating: 0, count: 10)
            for record in result.hooked.values {
                let offset = Double(time(record) &- result.releasedAt)
                bins[min(9, max(0, Int(10 * offset / span)))] += 1
            }
            return bins
        }
        let welcomed = counts(\.tWelcome).map { String(format: "%5d", $0) }.joined()
        let hooked = counts(\.tResult).map { String(format: "%5d", $0) }.joined()
        Swift.print("\(result.name): tenths of \(duration(span / 1e9)): WELCOMEd\(welcomed)")
        Swift.print("\(result.name): tenths of \(duration(span / 1e9)): hooked  \(hooked)")
    }

    /// This run for the series' summary: each side's time until all were hooked and its p99
    /// HELLO -> HOOK, both nil for a side that did not hook every guest.
    var seriesRun: StormSeries.Run {
        func p99(_ result: StormResult) -> Double? {
            guard allHookedSeconds(result) != nil else { return nil }
            return percentiles(helloToHook(result))?.1
        }
        return StormSeries.Run(
            floorAllHooked: allHookedSeconds(floor), brokerAllHooked: allHookedSeconds(broker), floorP99: p99(floor), brokerP99: p99(broker))
    }

    private func helloToHook(_ result: StormResult) -> [UInt64] { result.hooked.values.map { $0.tHook &- $0.tHello } }

    private func allHookedSeconds(_ result: StormResult) -> Double? {
        guard result.unfinished == nil, result.hooked.count == result.launched, let last = result.hooked.values.map(\.tResult).max() else {
            return nil
        }
        return Double(last &- result.releasedAt) / 1e9
    }

    private func cell(_ result: StormResult, _ seconds: Double?) -> String {
        if let seconds { return duration(seconds) }
        return result.unfinished ?? "did not finish: \(result.hooked.count) of \(result.launched) hooked"
    }

    private func percentiles(_ values: [UInt64]) -> (Double, Double, Double)? {
        guard !values.isEmpty else { return nil }
        let sorted = values.sorted()
        func rank(_ p: Double) -> Double { Double(sorted[min(sorted.count - 1, max(0, Int((p * Double(sorted.count)).rounded(.up)) - 1))]) / 1e9 }
        return (rank(0.50), rank(0.99), Double(sorted.last!) / 1e9)
    }

    private func triple(_ values: (Double, Double, Double)) -> String {
        "\(duration(values.0)) / \(duration(values.1)) / \(duration(values.2))"
    }

    private func ratio(_ floor: Double?, _ broker: Double?) -> String {
        guard let floor, let broker, floor > 0 else { return "-" }
        return String(format: "%.1fx", broker / floor)
    }

    private func duration(_ seconds: Double) -> String {
        if seconds < 0.001 { return String(format: "%.0f us", seconds * 1e6) }
        if seconds < 1 { return String(format: "%.1f ms", seconds * 1e3) }
        return String(format: "%.2f s", seconds)
    }

    private func pad(_ text: String, _ width: Int) -> String {
        text.count >= width ? text + " " : text + String(repeating: " ", count: width - text.count)
    }
}

// MARK: - Helpers

private func readProcFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let count = read(fd, &chunk, chunk.count)
        if count < 0 && errno == EINTR { continue }
        if count <= 0 { break }
        bytes += chunk.prefix(count)
    }
    return String(decoding: bytes, as: UTF8.self)
}

private func executablePath() -> String {
    (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
}

private func lookUp(_ program: String) -> String? {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
    return path.split(separator: ":").map { "\($0)/\(program)" }.first { FileManager.default.isExecutableFile(atPath: $0) }
}

/// A blocking pipe (the guests block on it), close-on-exec on both ends (set before any spawn:
/// this process spawns from one thread).
private func makePipe(nonBlocking: Bool = false) throws -> (read: Int32, write: Int32) {
    var fds: [Int32] = [0, 0]
    guard pipe(&fds) == 0 else { throw BrokerError(.io, "pipe failed", errno: errno) }
    for fd in fds {
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        if nonBlocking { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
    }
    return (fds[0], fds[1])
}

/// SIGINT and SIGTERM end the benchmark through its ordinary clean-up (no process left behind).
nonisolated(unsafe) private var interruptPipe: (read: Int32, write: Int32) = (-1, -1)

private func installInterruptHandler() throws {
    interruptPipe = try makePipe(nonBlocking: true)
    for number in [SIGINT, SIGTERM] {
        signal(number) { _ in
            var byte: UInt8 = 1
            _ = write(interruptPipe.write, &byte, 1)
        }
    }
}

private func checkInterrupt() throws {
    var byte: UInt8 = 0
    if read(interruptPipe.read, &byte, 1) == 1 { throw BrokerError(.cancelled, "interrupted") }
}
