import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import Testing

#if canImport(Glibc)
    import Glibc
#endif

extension OSLayerTests {
    @Suite("Secret files")
    struct SecretFileTests {
        func write(_ bytes: [UInt8], mode: mode_t) -> String {
            let path = "/tmp/kvmib-secret-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
            chmod(path, mode)
            return path
        }

        @Test("the exact bytes are read, trailing newline included")
        func exactBytes() throws {
            let path = write(Array("secret\n".utf8), mode: 0o600)
            defer { unlink(path) }
            #expect(try SecretFile.load(path) == Array("secret\n".utf8))
        }

        @Test("files others can read or write are refused", arguments: [mode_t(0o604), 0o602, 0o644, 0o666, 0o601])
        func refusesOthers(mode: mode_t) {
            let path = write(Array("x".utf8), mode: mode)
            defer { unlink(path) }
            #expect {
                try SecretFile.load(path)
            } throws: { error in
                guard let error = error as? BrokerError else { return false }
                return error.code == .insecureFile && error.location == path && error.message.contains("chmod o-rwx")
            }
        }

        @Test("group-readable is allowed (a group may run the tools)")
        func groupReadable() throws {
            let path = write(Array("x".utf8), mode: 0o640)
            defer { unlink(path) }
            #expect(try SecretFile.load(path) == [UInt8(ascii: "x")])
        }

        @Test("a group-writable secret is refused (the policy files' rule)", arguments: [mode_t(0o620), 0o660, 0o670])
        func refusesGroupWritable(mode: mode_t) {
            let path = write(Array("x".utf8), mode: mode)
            defer { unlink(path) }
            #expect {
                try SecretFile.load(path)
            } throws: { error in
                guard let error = error as? BrokerError else { return false }
                return error.code == .insecureFile && error.location == path && error.message.contains("writable by its group")
                    && error.message.contains("chmod g-w")
            }
        }

        @Test("a secret owned by another user is refused unless root ownership is relaxed, as for policy files")
        func refusesOtherOwner() throws {
            guard geteuid() == 0 else { return }  // chown needs root
            let path = write(Array("x".utf8), mode: 0o600)
            defer { unlink(path) }
            chown(path, 65534, 65534)
            #expect {
                try SecretFile.load(path)
            } throws: { error in
                guard let error = error as? BrokerError else { return false }
                return error.code == .insecureFile && error.message.contains("owned by uid 65534, not root")
            }
            #expect(try SecretFile.load(path, requireRootOwnership: false) == [UInt8(ascii: "x")])
        }

        @Test("symlinks, directories and missing files are refused with the path")
        func refusesOdd() {
            let target = write(Array("x".utf8), mode: 0o600)
            let link = target + ".link"
            symlink(target, link)
            defer {
                unlink(target)
                unlink(link)
            }
            for (path, text) in [(link, "symbolic link"), ("/tmp", "not a regular file"), ("/nonexistent/secret", "No such file")] {
                do {
                    _ = try SecretFile.load(path)
                    Issue.record("\(path) accepted")
                } catch {
                    #expect(error.location == path)
                    #expect(error.message.contains(text), "\(error)")
                }
            }
        }
    }
}
