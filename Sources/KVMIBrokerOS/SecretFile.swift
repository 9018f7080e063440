import KVMIBrokerCore

#if canImport(Glibc)
    import Glibc
#endif

/// The shared secret an introspector proves it knows. Its cookie is the SHA-1 of the file's
/// exact bytes, trailing newline included, as QEMU computes it.
public enum SecretFile {
    /// Secrets are small; anything larger is a mistake (a wrong path), not a secret.
    public static let maximumSize = 64 * 1024

    /// Reads the secret under the policy files' rules: refused if it is a symlink or not a
    /// regular file, if others may read, write or execute it, if its group may write it, or (with
    /// `requireRootOwnership`, the default) if it is owned by someone other than root or this
    /// process's own user. A group may read it (the group that runs the tools).
    public static func load(_ path: String, requireRootOwnership: Bool = true) throws(BrokerError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY)
        if fd < 0 {
            let error = errno
            let why = error == ELOOP ? "is a symbolic link; name the file itself" : String(cString: strerror(error))
            throw BrokerError(.io, "cannot open secret file: \(why)", at: path, errno: error)
        }
        let descriptor = Descriptor(adopting: fd)
        defer { descriptor.close() }
        var status = stat()
        try systemCall("fstat(\(path))") { fstat(fd, &status) }
        guard status.st_mode & S_IFMT == S_IFREG else {
            throw BrokerError(.insecureFile, "secret file is not a regular file", at: path)
        }
        let mode = status.st_mode & 0o7777
        let modeText = String(mode, radix: 8, uppercase: false).leftPadded(to: 4)
        if requireRootOwnership && status.st_uid != 0 && status.st_uid != geteuid() {
            throw BrokerError(
                .insecureFile,
                "secret file is owned by uid \(status.st_uid), not root (chown root; or --allow-non-root-owner for tests and unprivileged runs)",
                at: path)
        }
        guard mode & 0o007 == 0 else {
            throw BrokerError(.insecureFile, "secret file is accessible by others (mode \(modeText)); run 'chmod o-rwx' on it", at: path)
        }
        guard mode & 0o020 == 0 else {
            throw BrokerError(.insecureFile, "secret file is writable by its group (mode \(modeText)); run 'chmod g-w' on it", at: path)
        }
        guard status.st_size <= maximumSize else {
            throw BrokerError(.invalidArgument, "secret file is \(status.st_size) bytes; at most \(maximumSize) are accepted", at: path)
        }
        var bytes = [UInt8](repeating: 0, count: Int(status.st_size) + 1)
        var total = 0
        while total < bytes.count {
            let offset = total
            let count = bytes.withUnsafeMutableBytes { raw in read(fd, raw.baseAddress! + offset, raw.count - offset) }
            if count < 0 {
                if errno == EINTR { continue }
                throw BrokerError(.io, "cannot read secret file: \(String(cString: strerror(errno)))", at: path, errno: errno)
            }
            if count == 0 { break }
            total += count
        }
        guard total <= maximumSize else {
            throw BrokerError(.invalidArgument, "secret file grew past \(maximumSize) bytes while being read", at: path)
        }
        return Array(bytes[0..<total])
    }
}

extension String {
    func leftPadded(to width: Int, with pad: Character = "0") -> String {
        count >= width ? self : String(repeating: pad, count: width - count) + self
    }
}
