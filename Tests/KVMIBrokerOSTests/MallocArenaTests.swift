import Foundation
import KVMIBrokerCore
import Testing

#if canImport(Glibc)
    import Glibc
#endif

extension OSLayerTests {
    @Suite("kvmi-broker run allocates from glibc's main arena only")
    struct MallocArenaTests {
        /// glibc's other arenas, read from /proc/PID/maps. Each is a heap glibc maps at an address
        /// aligned to its 64 MiB maximum, spanning exactly that: anonymous, its used part
        /// read-write first, the rest reserved (`---p`) after it, so one or two lines. (A thread's
        /// stack is the other way round: its guard page first. The main arena grows with `brk`.)
        static func secondaryArenas(pid: Int32) -> Int {
            guard let maps = try? String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8) else { return -1 }
            let heapSize: UInt64 = 64 << 20
            var lines: [(start: UInt64, end: UInt64, permissions: Substring)] = []
            for line in maps.split(separator: "\n") {
                let fields = line.split(separator: " ", omittingEmptySubsequences: true)
                // Anonymous: no path, inode 0.
                guard fields.count == 5, fields[4] == "0" else { continue }
                let range = fields[0].split(separator: "-")
                guard range.count == 2, let start = UInt64(range[0], radix: 16), let end = UInt64(range[1], radix: 16) else { continue }
                lines.append((start, end, fields[1]))
            }
            var heaps = 0
            for (index, line) in lines.enumerated() where line.start % heapSize == 0 && line.permissions == "rw-p" {
                if line.end == line.start + heapSize {
                    heaps += 1
                } else if index + 1 < lines.count, lines[index + 1].start == line.end, lines[index + 1].permissions == "---p",
                    lines[index + 1].end == line.start + heapSize
                {
                    heaps += 1
                }
            }
            return heaps
        }

        @Test("the reactor, the log writer and Swift's pool threads share the main arena (no mprotect-grown heaps)")
        func oneArena() throws {
            let secret = temporarySecretFile("arena")
            defer { unlink(secret) }
            let channel = temporarySocketPath("arena")
            let broker = try ChildProcess(
                productsDirectory().appendingPathComponent("kvmi-broker"),
                [
                    "run", "--channel-socket", channel, "--introspector", "unix:\(temporarySocketPath("arena-tool"))",
                    "--secret-file", secret, "--abi", "v12", "--commands", "12", "--events", "0", "--log-level", "debug",
                    "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator", "/bin/true", "--control-socket", "",
                ])
            let pid = broker.process.pid
            // Every thread the broker has while it serves exists and has allocated: the reactor
            // (it accepts on the channel socket), the log writer (it wrote "listening"), and the
            // pool thread that ran `run`.
            #expect(eventually { broker.log.contains("listening") && FileManager.default.fileExists(atPath: channel) }, "broker log:\n\(broker.log)")
            #expect(eventually { Set(threadNames(pid: "\(pid)")).isSuperset(of: ["kvmib-reactor", "kvmib-log"]) }, "\(threadNames(pid: "\(pid)"))")
            #expect(Self.secondaryArenas(pid: pid) == 0, "maps:\n\((try? String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8)) ?? "")")
            broker.kill()
        }
    }
}
