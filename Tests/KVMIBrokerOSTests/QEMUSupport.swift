import Foundation
import KVMIBrokerCore
import KVMITestIntrospector

#if canImport(Glibc)
    import Glibc
#endif

/// The project root (for the build scripts).
let projectRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

/// Built once per test process and shared.
private final class ArtifactCache: @unchecked Sendable {
    let lock = NSLock()
    var paths: [String: String] = [:]
}
private let builtArtifacts = ArtifactCache()

private func buildOnce(_ key: String, _ build: () throws -> String) throws -> String {
    builtArtifacts.lock.lock()
    defer { builtArtifacts.lock.unlock() }
    if let path = builtArtifacts.paths[key] { return path }
    let path = try build()
    builtArtifacts.paths[key] = path
    return path
}

/// The patched QEMU: `$KVMIB_QEMU` when set (scripts/test sets it), else `qemu-patches/build`
/// builds it (cached by the series' hash; the first build takes minutes). No skip: a missing
/// QEMU is a failure.
func patchedQEMU() throws -> String {
    try buildOnce("qemu") {
        if let path = ProcessInfo.processInfo.environment["KVMIB_QEMU"], FileManager.default.isExecutableFile(atPath: path) { return path }
        let script = projectRoot.appendingPathComponent("qemu-patches/build")
        let (status, out, err) = try runProcess(script, [], timeout: 3600)
        let path = out.split(separator: "\n").last.map(String.init) ?? ""
        guard status == 0, FileManager.default.isExecutableFile(atPath: path) else {
            throw BrokerError(.io, "qemu-patches/build failed (status \(status)): \(err.suffix(2000))")
        }
        return path
    }
}

/// The kernel double's shared library (test equipment), built into .build/kernel-double.
func kernelDouble() throws -> String {
    try buildOnce("double") {
        let out = projectRoot.appendingPathComponent(".build/kernel-double").path
        let (status, _, err) = try runProcess(projectRoot.appendingPathComponent("Tests/KernelDouble/build"), [out], timeout: 300)
        let library = out + "/libkvmi-kernel-double.so"
        guard status == 0, FileManager.default.fileExists(atPath: library) else {
            throw BrokerError(.io, "Tests/KernelDouble/build failed: \(err)")
        }
        return library
    }
}

extension QEMUProcess {
    /// The patched QEMU from `patchedQEMU()`.
    convenience init(
        channelSocket: String, uuid: GuestUUID, name: String, extraArguments: [String] = [], kernelDouble: String? = nil, objectOptions: String = ""
    ) throws {
        try self.init(
            qemu: try patchedQEMU(), channelSocket: channelSocket, uuid: uuid, name: name, extraArguments: extraArguments, kernelDouble: kernelDouble,
            objectOptions: objectOptions)
    }
}

/// The firmware image that powers the guest off on the ACPI power button (test equipment,
/// Fixtures/acpi-poweroff-firmware.S), assembled with binutils into .build/test-firmware.
func acpiPoweroffFirmware() throws -> String {
    try buildOnce("acpi-poweroff-firmware") {
        let source = projectRoot.appendingPathComponent("Tests/KVMIBrokerOSTests/Fixtures/acpi-poweroff-firmware.S").path
        let directory = projectRoot.appendingPathComponent(".build/test-firmware").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let object = directory + "/acpi-poweroff.o"
        let image = directory + "/acpi-poweroff.bin"
        for (tool, arguments) in [
            ("/usr/bin/as", ["--32", "-o", object, source]),
            ("/usr/bin/ld", ["-m", "elf_i386", "-Ttext", "0", "-e", "0", "--oformat", "binary", "-o", image, object]),
        ] {
            let (status, _, err) = try runProcess(URL(fileURLWithPath: tool), arguments)
            guard status == 0 else { throw BrokerError(.io, "\(tool) failed building the test firmware: \(err)") }
        }
        let size = (try FileManager.default.attributesOfItem(atPath: image)[.size] as? NSNumber)?.intValue
        guard size == 65_536 else { throw BrokerError(.io, "the test firmware is \(size ?? 0) bytes, not 64 KiB", at: image) }
        return image
    }
}
