import Foundation
import KVMIBrokerCore
import KVMIBrokerPolicy
import Testing

@Suite("File hygiene and drop-in merging")
struct HygieneTests {
    static let rule = """
        [guest web]
        MatchName=web-*
        Introspector=acme
        Commands=VM_GET_INFO
        Events=UNHOOK

        """

    func load(_ roots: [String], requireRoot: Bool = false) -> Result<(Policy, [PolicyDiagnostic]), PolicyLoadError> {
        Result { () throws(PolicyLoadError) in try Policy.load(PolicySources(roots: roots, requireRootOwnership: requireRoot)) }
    }

    func messages(_ result: Result<(Policy, [PolicyDiagnostic]), PolicyLoadError>) -> [String] {
        switch result {
        case .success(let (_, warnings)): return warnings.map(\.description)
        case .failure(let error): return error.diagnostics.map(\.description)
        }
    }

    @Test("a file writable by group or others is refused, naming the file and the mode")
    func writable() {
        let root = TemporaryRoot()
        root.write("introspectors.d/10-i.conf", acmeIntrospectors)
        let file = root.write("guests.d/50-g.conf", Self.rule, mode: 0o664)
        #expect(messages(load([root.path])) == ["\(file): refused: the file is writable by group (mode 0664); chmod go-w"])
        chmod(file, 0o646)
        #expect(messages(load([root.path])) == ["\(file): refused: the file is writable by others (mode 0646); chmod go-w"])
        chmod(file, 0o644)
        #expect(messages(load([root.path])).isEmpty)
    }

    @Test("a file not owned by root is refused unless relaxed")
    func owner() throws {
        let root = TemporaryRoot()
        root.write("introspectors.d/10-i.conf", acmeIntrospectors)
        let file = root.write("guests.d/50-g.conf", Self.rule)
        guard geteuid() == 0 else { return }  // chown needs root
        chown(file, 65534, 65534)
        #expect(messages(load([root.path], requireRoot: true)) == ["\(file): refused: the file is owned by uid 65534, not root (chown root)"])
        #expect(messages(load([root.path], requireRoot: false)).isEmpty)
    }

    @Test("a group-writable directory is refused")
    func directory() {
        let root = TemporaryRoot()
        chmod(root.path + "/guests.d", 0o775)
        #expect(messages(load([root.path])) == ["\(root.path)/guests.d: refused: the directory is writable by group (mode 0775); chmod go-w"])
    }

    @Test("symlinks: inside the tree followed, out of the tree refused, dangling refused, /dev/null masks")
    func symlinks() throws {
        let root = TemporaryRoot()
        let outside = TemporaryRoot()
        root.write("introspectors.d/10-i.conf", acmeIntrospectors)
        mkdir(root.path + "/shared", 0o755)
        root.write("shared/web.conf", Self.rule)
        symlink(root.path + "/shared/web.conf", root.path + "/guests.d/50-web.conf")
        guard case .success(let (policy, _)) = load([root.path]) else {
            Issue.record("a symlink inside the tree must load")
            return
        }
        #expect(policy.rules.count == 1)
        let outsideReal = try #require(real(outside.path))
        let rootReal = try #require(real(root.path))
        outside.write("guests.d/evil.conf", Self.rule)
        symlink(outside.path + "/guests.d/evil.conf", root.path + "/guests.d/60-evil.conf")
        symlink(root.path + "/nowhere.conf", root.path + "/guests.d/70-dangling.conf")
        #expect(
            messages(load([root.path])) == [
                "\(root.path)/guests.d/60-evil.conf: refused: the symlink leads out of the policy tree \(rootReal) (to \(outsideReal)/guests.d/evil.conf)",
                "\(root.path)/guests.d/70-dangling.conf: refused: the symlink leads nowhere (ENOENT)",
            ])
    }

    @Test("files not ending in .conf and hidden files are skipped with a warning")
    func suffix() {
        let root = TemporaryRoot()
        root.write("introspectors.d/10-i.conf", acmeIntrospectors)
        root.write("guests.d/50-g.conf.rpmsave", "garbage")
        root.write("guests.d/.50-g.conf.swp", "garbage")
        guard case .success(let (policy, warnings)) = load([root.path]) else {
            Issue.record("skipped files must not fail the load")
            return
        }
        #expect(policy.rules.isEmpty)
        #expect(
            warnings.map(\.description) == [
                "\(root.path)/guests.d/.50-g.conf.swp: warning: ignored: hidden file",
                "\(root.path)/guests.d/50-g.conf.rpmsave: warning: ignored: the name does not end in .conf",
            ])
    }

    @Test("a same-named file in a later root replaces the vendor file; a symlink to /dev/null masks it; order is by file name across roots")
    func dropIns() {
        let vendor = TemporaryRoot()
        let site = TemporaryRoot()
        vendor.write("introspectors.d/10-i.conf", acmeIntrospectors)
        vendor.write("guests.d/10-vendor.conf", Self.rule.replacingOccurrences(of: "web", with: "vendor"))
        vendor.write("guests.d/20-masked.conf", Self.rule.replacingOccurrences(of: "web", with: "masked"))
        vendor.write("guests.d/90-late.conf", Self.rule.replacingOccurrences(of: "[guest web]", with: "[guest late]"))
        site.write("guests.d/10-vendor.conf", Self.rule.replacingOccurrences(of: "web", with: "site"))
        symlink("/dev/null", site.path + "/guests.d/20-masked.conf")
        site.write("guests.d/50-web.conf", Self.rule)
        guard case .success(let (policy, _)) = load([vendor.path, site.path]) else {
            Issue.record("must load")
            return
        }
        #expect(policy.rules.map(\.name) == ["site", "web", "late"])
        #expect(
            policy.rules.map(\.location.file) == [
                site.path + "/guests.d/10-vendor.conf", site.path + "/guests.d/50-web.conf", vendor.path + "/guests.d/90-late.conf",
            ])
        let facts = GuestFacts(uuid: GuestUUID.zero, name: "web-1")
        #expect(policy.decide(facts).rule?.section == "guest late", "the lexicographically latest file wins within a class")
        #expect(policy.files.first { $0.path.hasSuffix("20-masked.conf") }?.status == .masked)
        #expect(policy.files.first { $0.path.hasSuffix("10-vendor.conf") }?.overrides == [vendor.path + "/guests.d/10-vendor.conf"])
    }

    @Test("an error anywhere fails the whole load: nothing half-parsed can widen access")
    func allOrNothing() {
        let root = TemporaryRoot()
        root.write("introspectors.d/10-i.conf", acmeIntrospectors)
        root.write("guests.d/10-good.conf", Self.rule)
        root.write("guests.d/20-bad.conf", "[guest x]\nbroken line\n")
        guard case .failure(let error) = load([root.path]) else {
            Issue.record("must fail")
            return
        }
        #expect(
            error.errors.map(\.description) == [
                "\(root.path)/guests.d/20-bad.conf:2: 'broken line' is not 'Key=Value', a [section] header or a '#' comment"
            ])
        #expect(error.brokerError.location == "\(root.path)/guests.d/20-bad.conf:2")
    }

    @Test("no directories at all: a warning, and every guest is denied")
    func empty() {
        let root = TemporaryRoot()
        rmdir(root.path + "/guests.d")
        rmdir(root.path + "/introspectors.d")
        guard case .success(let (policy, warnings)) = load([root.path]) else {
            Issue.record("must load")
            return
        }
        #expect(
            warnings.map(\.description) == ["warning: no policy directories found (\(root.path)/{introspectors.d,guests.d}): every guest is denied"])
        #expect(!policy.decide(GuestFacts(uuid: .zero, name: "x")).introspected)
    }

    /// Loaded from a copy with the modes an installation has: a checkout made under umask 002
    /// has group-writable files, which the loader rightly refuses, and that is not the examples' fault.
    @Test("the shipped examples under policy/ load without errors or warnings")
    func shippedExamples() throws {
        let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let root = TemporaryRoot()
        var copied = 0
        for directory in ["introspectors.d", "guests.d"] {
            let shipped = repository.appendingPathComponent("policy/\(directory)").path
            for file in try FileManager.default.contentsOfDirectory(atPath: shipped).sorted() where file.hasSuffix(".conf") {
                root.write("\(directory)/\(file)", bytes: try Data(contentsOf: URL(fileURLWithPath: "\(shipped)/\(file)")))
                copied += 1
            }
        }
        #expect(copied >= 2)
        #expect(messages(load([root.path])) == [])
    }
}

func real(_ path: String) -> String? {
    guard let resolved = realpath(path, nil) else { return nil }
    defer { free(resolved) }
    return String(cString: resolved)
}
