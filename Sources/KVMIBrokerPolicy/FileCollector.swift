import KVMIBrokerCore

#if canImport(Glibc)
    import Glibc
#endif

/// The bytes of one policy file and which directory it came from.
struct SourceFile {
    enum Kind: String {
        case introspectors = "introspectors.d"
        case guests = "guests.d"
    }

    var path: String
    var kind: Kind
    var bytes: [UInt8]
}

/// Walks the drop-in directories: merge by file name across roots, lexicographic order, and
/// file hygiene (owner, mode, symlinks, suffix).
enum PolicyFileCollector {
    struct Result {
        var files: [SourceFile] = []
        var entries: [PolicyFileEntry] = []
        var diagnostics: [PolicyDiagnostic] = []
    }

    static func collect(_ sources: PolicySources) -> Result {
        var result = Result()
        var anyDirectory = false
        for kind in [SourceFile.Kind.introspectors, .guests] {
            // name -> (path, root's real path); later roots replace earlier ones.
            var chosen: [String: (path: String, realRoot: String)] = [:]
            var hidden: [String: [String]] = [:]
            for root in sources.roots {
                let directory = join(root, kind.rawValue)
                var info = stat()
                guard stat(directory, &info) == 0 else {
                    if errno != ENOENT {
                        result.diagnostics.append(
                            PolicyDiagnostic(.error, .io, file: directory, line: nil, "cannot read the directory (\(errnoName(errno)))"))
                    }
                    continue
                }
                guard info.st_mode & S_IFMT == S_IFDIR else {
                    result.diagnostics.append(PolicyDiagnostic(.error, file: directory, line: nil, "not a directory"))
                    continue
                }
                anyDirectory = true
                if let problem = ownershipProblem(info, sources, what: "directory") {
                    result.diagnostics.append(PolicyDiagnostic(.error, .insecureFile, file: directory, line: nil, problem))
                    continue
                }
                let realRoot = realPath(root) ?? root
                guard let names = listDirectory(directory) else {
                    result.diagnostics.append(
                        PolicyDiagnostic(.error, .io, file: directory, line: nil, "cannot list the directory (\(errnoName(errno)))"))
                    continue
                }
                for name in names {
                    let path = join(directory, name)
                    if name.hasPrefix(".") {
                        result.diagnostics.append(PolicyDiagnostic(.warning, file: path, line: nil, "ignored: hidden file"))
                        continue
                    }
                    guard name.hasSuffix(".conf") else {
                        result.diagnostics.append(PolicyDiagnostic(.warning, file: path, line: nil, "ignored: the name does not end in .conf"))
                        continue
                    }
                    if let previous = chosen[name] { hidden[name, default: []].append(previous.path) }
                    chosen[name] = (path, realRoot)
                }
            }
            let ordered = chosen.keys.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }
            for name in ordered {
                guard let (path, realRoot) = chosen[name] else { continue }
                let overrides = hidden[name] ?? []
                switch read(path, realRoot: realRoot, sources) {
                case .masked:
                    result.entries.append(PolicyFileEntry(path: path, status: .masked, overrides: overrides))
                case .contents(let bytes):
                    result.entries.append(PolicyFileEntry(path: path, status: .read, overrides: overrides))
                    result.files.append(SourceFile(path: path, kind: kind, bytes: bytes))
                case .refused(let diagnostic):
                    result.diagnostics.append(diagnostic)
                }
            }
        }
        if !anyDirectory {
            let places = sources.roots.map { "\($0)/{introspectors.d,guests.d}" }.joined(separator: ", ")
            result.diagnostics.append(
                PolicyDiagnostic(.warning, file: nil, line: nil, "no policy directories found (\(places)): every guest is denied"))
        }
        return result
    }

    enum ReadOutcome {
        case contents([UInt8])
        case masked
        case refused(PolicyDiagnostic)
    }

    static func read(_ path: String, realRoot: String, _ sources: PolicySources) -> ReadOutcome {
        func refuse(_ message: String, _ code: BrokerError.Code = .insecureFile) -> ReadOutcome {
            .refused(PolicyDiagnostic(.error, code, file: path, line: nil, message))
        }
        var link = stat()
        guard lstat(path, &link) == 0 else { return refuse("cannot read the file (\(errnoName(errno)))", .io) }
        if link.st_mode & S_IFMT == S_IFLNK {
            guard let target = realPath(path) else { return refuse("refused: the symlink leads nowhere (\(errnoName(errno)))") }
            if target == "/dev/null" { return .masked }
            guard target.hasPrefix(realRoot.hasSuffix("/") ? realRoot : realRoot + "/") else {
                return refuse("refused: the symlink leads out of the policy tree \(realRoot) (to \(target))")
            }
        }
        var info = stat()
        guard stat(path, &info) == 0 else { return refuse("cannot read the file (\(errnoName(errno)))", .io) }
        guard info.st_mode & S_IFMT == S_IFREG else { return refuse("refused: not a regular file") }
        if let problem = ownershipProblem(info, sources, what: "file") { return refuse(problem) }
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY)
        guard fd >= 0 else { return refuse("cannot open the file (\(errnoName(errno)))", .io) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                return refuse("cannot read the file (\(errnoName(errno)))", .io)
            }
            if count == 0 { break }
            bytes += buffer[0..<count]
            if bytes.count > 16 << 20 { return refuse("refused: larger than 16 MiB", .invalidArgument) }
        }
        return .contents(bytes)
    }

    static func ownershipProblem(_ info: stat, _ sources: PolicySources, what: String) -> String? {
        if sources.requireRootOwnership && info.st_uid != 0 {
            return "refused: the \(what) is owned by uid \(info.st_uid), not root (chown root)"
        }
        let mode = info.st_mode & 0o7777
        if mode & 0o022 != 0 {
            let who = mode & 0o020 != 0 && mode & 0o002 != 0 ? "group and others" : mode & 0o020 != 0 ? "group" : "others"
            return "refused: the \(what) is writable by \(who) (mode \(String(mode, radix: 8, uppercase: false).leftPadded(to: 4))); chmod go-w"
        }
        return nil
    }

    static func listDirectory(_ path: String) -> [String]? {
        guard let directory = opendir(path) else { return nil }
        defer { closedir(directory) }
        var names: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }
    }

    static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    static func join(_ directory: String, _ name: String) -> String {
        directory.hasSuffix("/") ? directory + name : directory + "/" + name
    }
}

extension String {
    func leftPadded(to width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}
