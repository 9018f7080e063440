import Testing

@testable import KVMIBrokerCore

@Suite("Per-guest endpoint templates")
struct EndpointTemplateTests {
    let uuid = GuestUUID("6a1f0c2e-9b3d-4e5f-8a7b-1c2d3e4f5a6b")!

    @Test("an endpoint without placeholders is fixed and the same as IntrospectorEndpoint's")
    func fixed() throws {
        let template = try EndpointTemplate(parsing: "unix:/run/acme/kvmi.sock")
        #expect(!template.isPerGuest)
        #expect(template.fixed == .unix(path: "/run/acme/kvmi.sock"))
        #expect(try template.expanded(uuid: uuid, name: "any/thing") == .unix(path: "/run/acme/kvmi.sock"))
        #expect(try EndpointTemplate(parsing: "vsock:3:1234").fixed == .vsock(cid: 3, port: 1234))
    }

    @Test(
        "{uuid} and {name} expand in unix paths and abstract names",
        arguments: [
            ("unix:/run/acme/{uuid}.sock", "web-1", "unix:/run/acme/6a1f0c2e-9b3d-4e5f-8a7b-1c2d3e4f5a6b.sock"),
            ("unix:/run/acme/{name}.sock", "web-1", "unix:/run/acme/web-1.sock"),
            ("unix:/run/acme/{name}/{uuid}", "db", "unix:/run/acme/db/6a1f0c2e-9b3d-4e5f-8a7b-1c2d3e4f5a6b"),
            ("unix:@acme-{uuid}", "x", "unix:@acme-6a1f0c2e-9b3d-4e5f-8a7b-1c2d3e4f5a6b"),
            ("unix:/run/acme/{name}.sock", "caf\u{E9} .. x", "unix:/run/acme/caf\u{E9} .. x.sock"),
        ])
    func expands(template: String, name: String, expected: String) throws {
        let parsed = try EndpointTemplate(parsing: template)
        #expect(parsed.isPerGuest)
        #expect(parsed.description == template)
        #expect(try parsed.expanded(uuid: uuid, name: name).description == expected)
    }

    @Test(
        "a template is refused when it is read, saying why",
        arguments: [
            ("vsock:3:{uuid}", "allowed only in unix: socket paths and abstract names"),
            ("vsock:{uuid}:1234", "allowed only in unix: socket paths and abstract names"),
            ("tcp:127.0.0.1:{name}", "allowed only in unix: socket paths and abstract names"),
            ("unix:/run/{guest}.sock", "unknown placeholder '{guest}'; use {uuid} or {name}"),
            ("unix:/run/{uuid.sock", "a '{' without its '}'"),
            ("unix:/run/uuid}.sock", "a '}' without its '{'"),
            ("unix:{name}/x.sock", "must start with '/'"),
            ("unix:/run/../{uuid}.sock", "'..' as a path component"),
            ("unix:/" + String(repeating: "a", count: 70) + "/{uuid}.sock", "even the shortest expansion"),
        ])
    func refusedAtLoad(template: String, why: String) {
        #expect {
            _ = try EndpointTemplate(parsing: template)
        } throws: { error in
            guard let error = error as? BrokerError else { return false }
            return error.code == .invalidEndpoint && error.message.contains(why)
        }
    }

    @Test(
        "an expansion that would be unsafe or too long is refused, naming the guest UUID and the rule",
        arguments: [
            ("unix:/run/acme/{name}.sock", "a/b", "contains '/', which would reach another directory"),
            ("unix:/run/acme/{name}.sock", "../../etc/x", "contains '/'"),
            ("unix:/run/acme/{name}/s", "..", "'..' as a component"),
            ("unix:/run/acme/{name}{name}/s", ".", "'..' as a component"),
            ("unix:/run/acme/{name}.sock", "a\u{0}b", "contains a NUL byte"),
            ("unix:/run/acme/{name}.sock", "a\nb", "contains a control character"),
            ("unix:/run/acme/{name}.sock", "a\u{1B}[31m", "contains a control character"),
            ("unix:/run/acme/{name}.sock", "a\u{85}b", "contains a control character"),
            // What a log must escape: a bidirectional override, a line separator, a byte-order mark.
            ("unix:/run/acme/{name}.sock", "invoice\u{202E}fdp.exe", "one a log must escape"),
            ("unix:/run/acme/{name}.sock", "a\u{2028}b", "one a log must escape"),
            ("unix:/run/acme/{name}.sock", "\u{FEFF}web", "one a log must escape"),
            ("unix:/run/acme/{name}.sock", "", "the domain name is empty"),
            ("unix:/run/acme/{name}.sock", String(repeating: "n", count: 93), "expands to 108 bytes"),
            ("unix:@acme-{name}", String(repeating: "n", count: 102), "expands to 108 bytes"),
        ])
    func refusedAtExpansion(template: String, name: String, why: String) throws {
        let parsed = try EndpointTemplate(parsing: template)
        #expect {
            _ = try parsed.expanded(uuid: uuid, name: name)
        } throws: { error in
            guard let error = error as? BrokerError else { return false }
            return error.code == .invalidEndpoint && error.message.contains(why) && error.location == "guest \(uuid)"
                && !error.description.contains("\n") && !error.description.contains("\u{1B}")
        }
    }

    @Test("the longest name that fits is accepted (107 bytes and the NUL)")
    func longestFits() throws {
        let parsed = try EndpointTemplate(parsing: "unix:/run/acme/{name}.sock")
        let endpoint = try parsed.expanded(uuid: uuid, name: String(repeating: "n", count: 92))
        guard case .unix(let path) = endpoint else { throw BrokerError(.invalidEndpoint, "not unix") }
        #expect(path.utf8.count == IntrospectorEndpoint.maximumUnixPathBytes)
    }
}
