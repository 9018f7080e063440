import Foundation
import KVMIBrokerPolicy
import Testing

/// Every bad file of the corpus yields exactly the diagnostics written in it.
@Suite("Corpus of bad files")
struct CorpusTests {
    static var corpus: URL { Bundle.module.url(forResource: "Corpus", withExtension: nil)! }

    static func cases() -> [String] {
        ["guests.d", "introspectors.d"].flatMap { directory in
            ((try? FileManager.default.contentsOfDirectory(atPath: corpus.appendingPathComponent(directory).path)) ?? [])
                .filter { $0.hasSuffix(".conf") }.sorted().map { "\(directory)/\($0)" }
        }
    }

    @Test("the corpus is there")
    func corpusPresent() {
        #expect(Self.cases().count >= 30)
    }

    @Test("each bad file gives exactly its expected diagnostics", arguments: cases())
    func badFile(_ relative: String) throws {
        let root = TemporaryRoot()
        let bytes = try Data(contentsOf: Self.corpus.appendingPathComponent(relative))
        if relative.hasPrefix("guests.d/") {
            let base = try String(contentsOf: Self.corpus.appendingPathComponent("base/introspectors.d/10-base.conf"), encoding: .utf8)
            root.write("introspectors.d/10-base.conf", base)
        }
        root.write(relative, bytes: bytes)
        let file = "\(root.path)/\(relative)"
        var expected: [String] = []
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            for (marker, severity) in [("# expect: ", ""), ("# expect-warning: ", "warning: ")] where line.hasPrefix(marker) {
                let rest = line.dropFirst(marker.count)
                guard let colon = rest.firstIndex(of: ":") else { continue }
                let number = rest[..<colon]
                let message = rest[rest.index(colon, offsetBy: 2)...].replacingOccurrences(of: "ROOT", with: root.path)
                expected.append(number == "-" ? "\(file): \(severity)\(message)" : "\(file):\(number): \(severity)\(message)")
            }
        }
        #expect(!expected.isEmpty, "\(relative) states no expectation")
        let diagnostics: [PolicyDiagnostic]
        do {
            diagnostics = try Policy.load(PolicySources(roots: [root.path], requireRootOwnership: false)).1
        } catch {
            diagnostics = error.diagnostics
        }
        #expect(diagnostics.map(\.description).sorted() == expected.sorted())
    }
}
