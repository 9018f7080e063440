import Foundation
import KVMIBrokerCore

#if canImport(Glibc)
    import Glibc
#endif

/// Reads the status file for `kvmi-broker status`, with one sentence per way it can fail, and
/// tells whether the broker that wrote it still runs.
public enum StatusReader {
    /// Why there is no status to show. Exit codes follow the LSB's for `status`: 3 "not
    /// running", 1 "dead but its status file remains", 4 "unknown".
    public enum Problem: Error, Equatable, CustomStringConvertible {
        case absent(path: String)
        case permissionDenied(path: String, group: String?)
        case unreadable(path: String, reason: String)
        case unparsable(path: String, reason: String)
        case stale(path: String, pid: Int32, reused: Bool)

        public var description: String {
            switch self {
            case .absent(let path):
                return "no status file at \(path): the broker is not running or writes its status elsewhere (--status-file)"
            case .permissionDenied(let path, let group):
                let readers = group.map { "root or members of its group \($0)" } ?? "root or members of the file's group"
                return "cannot read the status file \(path): permission denied (only \(readers) may read it)"
            case .unreadable(let path, let reason):
                return "cannot read the status file \(path): \(reason)"
            case .unparsable(let path, let reason):
                return "the status file \(path) is not a status file this kvmi-broker (\(BrokerVersion.string)) can read: \(reason)"
            case .stale(let path, let pid, let reused):
                return
                    "the status file \(path) is stale: written by pid \(pid) which is not running\(reused ? " (that pid is now another process)" : "")"
            }
        }

        public var exitCode: Int32 {
            switch self {
            case .absent: return 3
            case .stale: return 1
            case .permissionDenied, .unreadable, .unparsable: return 4
            }
        }
    }

    /// The status file's bytes and document, or why not. (It is read whole: the broker
    /// replaces it by rename, never rewrites it in place.)
    public static func read(_ path: String) -> Result<(data: Data, document: StatusDocument), Problem> {
        let shown = escapedForLog(path)
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let code = errno
            switch code {
            case ENOENT: return .failure(.absent(path: shown))
            case EACCES, EPERM: return .failure(.permissionDenied(path: shown, group: group(of: path)))
            default: return .failure(.unreadable(path: shown, reason: String(cString: strerror(code))))
            }
        }
        defer { close(fd) }
        var data = Data()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = Glibc.read(fd, &chunk, chunk.count)
            if count < 0 {
                if errno == EINTR { continue }
                return .failure(.unreadable(path: shown, reason: String(cString: strerror(errno))))
            }
            if count == 0 { break }
            data.append(contentsOf: chunk[0..<count])
            guard data.count <= 256 << 20 else { return .failure(.unparsable(path: shown, reason: "it is larger than 256 MiB")) }
        }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        do {
            return .success((data, try decoder.decode(StatusDocument.self, from: data)))
        } catch {
            if (try? decoder.decode([SessionStatus].self, from: data)) != nil {
                return .failure(.unparsable(path: shown, reason: "it has no broker section (written by a kvmi-broker before 0.9.0?)"))
            }
            return .failure(.unparsable(path: shown, reason: data.isEmpty ? "it is empty" : "it is not the broker's JSON"))
        }
    }

    /// nil when the broker that wrote `document` runs, else `.stale`.
    public static func staleness(of document: StatusDocument, path: String, procRoot: String = "/proc") -> Problem? {
        let pid = document.broker.pid
        guard pid > 0, kill(pid, 0) == 0 || errno == EPERM else {
            return .stale(path: escapedForLog(path), pid: pid, reused: false)
        }
        if let recorded = document.broker.startTime, let now = BrokerStatus.processStartTime(pid, procRoot: procRoot), now != recorded {
            return .stale(path: escapedForLog(path), pid: pid, reused: true)
        }
        return nil
    }

    /// The name of the group of the file at `path` (nil if it cannot be said).
    static func group(of path: String) -> String? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        guard let entry = getgrgid(info.st_gid) else { return "\(info.st_gid)" }
        return escapedForLog(String(cString: entry.pointee.gr_name), limit: 64)
    }
}
