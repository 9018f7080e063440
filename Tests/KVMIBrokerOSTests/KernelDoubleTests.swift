import Foundation
import Testing

extension OSLayerTests {
    /// The kernel double (test equipment, Tests/KernelDouble) has its own C test program; run it
    /// here so the README's test command covers it.
    @Suite("Kernel double (LD_PRELOAD stand-in for a KVMI kernel)")
    struct KernelDoubleTests {
        @Test("its C test suite passes for both ABI generations")
        func cSuite() throws {
            let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
                .appendingPathComponent("KernelDouble/run-tests")
            let (status, out, err) = try runProcess(script, [], timeout: 300)
            let summary = out.split(separator: "\n").last.map(String.init) ?? ""
            #expect(status == 0, "run-tests failed:\n\(out.split(separator: "\n").filter { $0.hasPrefix("FAIL") }.joined(separator: "\n"))\n\(err)")
            #expect(summary.hasSuffix(" 0 failed") && !summary.hasPrefix("0 passed"), "summary: \(summary)")
        }
    }
}
