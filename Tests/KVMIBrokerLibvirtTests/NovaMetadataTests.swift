import CLibvirt
import Foundation
import KVMIBrokerCore
import Testing

@testable import KVMIBrokerLibvirt

/// OpenStack Nova's `<nova:instance>` as Nova writes it (`LibvirtConfigGuestMetaNovaInstance` in
/// nova/virt/libvirt/config.py, namespace 1.1), read from domain XML, from the test driver and
/// from a real libvirtd.
let novaProjectID = "8e6b2b4ab9e04d5f8d9e3c9c5e1a2b3c"
let novaImageID = "4a5e2f7c-9b1d-4c3e-8f6a-2b7d9e0c1a3f"

func novaInstance(version: String = "1.1", extra: String = "") -> String {
    """
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/\(version)">
          <nova:package version="29.0.0"/>
          <nova:name>web-1</nova:name>
          <nova:creationTime>2024-05-01 10:00:00</nova:creationTime>
          <nova:flavor name="m1.small" id="2">
            <nova:memory>2048</nova:memory><nova:disk>20</nova:disk><nova:swap>0</nova:swap>
            <nova:ephemeral>0</nova:ephemeral><nova:vcpus>1</nova:vcpus><nova:extraSpecs/>
          </nova:flavor>
          <nova:owner>
            <nova:user uuid="0d9b2c6f5e4d4c3b9a8f7e6d5c4b3a29">alice</nova:user>
            <nova:project uuid="\(novaProjectID)">demo</nova:project>
          </nova:owner>
          <nova:root type="image" uuid="\(novaImageID)"/>
          <nova:ports><nova:port uuid="5f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"><nova:ip type="fixed" address="10.0.0.5" ipVersion="4"/></nova:port></nova:ports>\(extra)
        </nova:instance>
    """
}

func domainXML(name: String, uuid: String, metadata: String) -> String {
    """
    <domain type='test'>
      <name>\(name)</name>
      <uuid>\(uuid)</uuid>
      <memory>65536</memory>
      <os><type>hvm</type></os>
      <metadata>\(metadata)</metadata>
      <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
    </domain>
    """
}

@Suite struct NovaMetadataTests {
    static let expected = NovaMetadata(
        namespace: "http://openstack.org/xmlns/libvirt/nova/1.1", projectID: novaProjectID, projectName: "demo",
        userID: "0d9b2c6f5e4d4c3b9a8f7e6d5c4b3a29", userName: "alice", flavorName: "m1.small", imageID: novaImageID, instanceName: "web-1")

    @Test("Nova's 1.1 and 1.0 elements are read whatever their prefix; a domain without one has none")
    func readsNovaShapes() throws {
        let uuid = "22222222-0000-4000-8000-000000000001"
        #expect(try DomainDescription(xml: domainXML(name: "i-1", uuid: uuid, metadata: novaInstance())).nova == Self.expected)
        var old = Self.expected
        old.namespace = "http://openstack.org/xmlns/libvirt/nova/1.0"
        #expect(try DomainDescription(xml: domainXML(name: "i-1", uuid: uuid, metadata: novaInstance(version: "1.0"))).nova == old)
        let otherPrefix = novaInstance().replacingOccurrences(of: "nova:", with: "os:").replacingOccurrences(of: "xmlns:nova", with: "xmlns:os")
        #expect(try DomainDescription(xml: domainXML(name: "i-1", uuid: uuid, metadata: otherPrefix)).nova == Self.expected)
        #expect(try DomainDescription(xml: domainXML(name: "i-1", uuid: uuid, metadata: "")).nova == nil)
        let volume = novaInstance().replacingOccurrences(of: "type=\"image\"", with: "type=\"volume\"")
        #expect(try DomainDescription(xml: domainXML(name: "i-1", uuid: uuid, metadata: volume)).nova?.imageID == nil)
    }

    @Test("unknown major versions, repeated children, contradictions and bad ids are problems, not errors of the domain")
    func strictness() throws {
        let uuid = "22222222-0000-4000-8000-000000000001"
        func problem(_ metadata: String) throws -> String? {
            try DomainDescription(xml: domainXML(name: "i-1", uuid: uuid, metadata: metadata)).nova?.problem
        }
        #expect(
            try problem(novaInstance(version: "2.0"))
                == "Nova namespace http://openstack.org/xmlns/libvirt/nova/2.0 is not a version this broker reads (1.x)")
        #expect(try problem(novaInstance(extra: "<nova:flavor name=\"x\"/>")) == "<nova:flavor> appears 2 times in <nova:instance>")
        #expect(
            try problem(novaInstance(extra: "<nova:image uuid=\"11111111-0000-4000-8000-000000000001\"/>"))
                == "<nova:image uuid=\"11111111-0000-4000-8000-000000000001\"> contradicts <nova:root type=\"image\" uuid=\"\(novaImageID)\">")
        #expect(
            try problem(novaInstance().replacingOccurrences(of: novaProjectID, with: "demo project"))
                == "<nova:project uuid> 'demo project' is not an id (1 to 64 letters, digits, '-' or '_')")
        let long = String(repeating: "x", count: 300)
        #expect(try problem(novaInstance().replacingOccurrences(of: ">demo<", with: ">\(long)<")) == "<nova:project> is 300 bytes long (at most 255)")
        #expect(try problem(novaInstance() + novaInstance(version: "1.0"))?.hasPrefix("the domain carries 2 Nova elements") == true)
        // With a broken Nova element, our own metadata is still read.
        let both = novaInstance(version: "9.9") + #"<kvmi:introspection xmlns:kvmi="https://kvmi-broker.org/xmlns/1" introspector="acme"/>"#
        #expect(try DomainDescription(xml: domainXML(name: "i-1", uuid: uuid, metadata: both)).metadata?.introspector == "acme")
    }

    @Test("the test driver keeps Nova's element; the identity read (live XML) carries it")
    func testDriverIdentityRead() throws {
        let directory = NSTemporaryDirectory() + "kvmib-nova-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory + "/run", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let uuid = "22222222-0000-4000-8000-000000000002"
        try "<node>\(domainXML(name: "instance-0000002a", uuid: uuid, metadata: novaInstance()))</node>".write(
            toFile: directory + "/node.xml", atomically: true, encoding: .utf8)
        let connection = try LibvirtConnection.open("test://\(directory)/node.xml", readOnly: true)
        let locator = QEMUProcessLocator(runDirectory: directory + "/run")
        let live = try #require(try connection.domain(uuid: GuestUUID(uuid)!, locator: locator, live: true))
        #expect(live.nova == Self.expected)
        // Without the live XML (listing, events) Nova's element is not read: no extra libvirt call per domain.
        #expect(try connection.domain(uuid: GuestUUID(uuid)!, locator: locator)?.nova == nil)
    }
}

/// In the smoke tests' suite, which is serialized: they restart and freeze the real libvirtd,
/// which closed this test's connection when both ran at once.
extension RealLibvirtdSmokeTests {
    /// A domain with Nova's metadata on the real libvirtd (`scripts/libvirtd-ci start`), cloned
    /// from the CI's shut-off smoke domain: libvirt keeps the element, and the identity read of
    /// the running domain (live XML) carries the project, flavor and image. Undefined afterwards.
    @Test func novaMetadataThroughTheRealLibvirtd() throws {
        let template = try #require(ProcessInfo.processInfo.environment["KVMIB_REAL_LIBVIRT_DOMAIN"])
        let control = try LibvirtConnection.open("qemu:///system", readOnly: false)
        let name = "wtnova-nova-\(UInt32.random(in: 0...UInt32.max))"
        var root = try control.withDomain(template) { domain throws(BrokerError) in
            try MarkupElement.parse(try control.inactiveXML(of: domain, place: template))
        }
        root.children = root.children.filter { node in
            if case .element(let element) = node { return !["name", "uuid", "metadata"].contains(element.name) }
            return true
        }
        var generator = SystemRandomNumberGenerator()
        let uuid = GuestUUID.random(using: &generator)
        let metadata = try MarkupElement.parse("<metadata>\(novaInstance())</metadata>")
        root.children.insert(
            contentsOf: [
                .element(MarkupElement("name", children: [.text(name)])), .element(MarkupElement("uuid", children: [.text(uuid.description)])),
                .element(metadata),
            ], at: 0)
        guard let defined = virDomainDefineXML(control.pointer, root.serialized()) else {
            throw LibvirtConnection.lastError(.io, "define", at: name)
        }
        defer {
            if virDomainIsActive(defined) == 1 { virDomainDestroy(defined) }
            virDomainUndefine(defined)
            virDomainFree(defined)
        }
        let stored = try control.withDomain(name) { domain throws(BrokerError) in
            try DomainDescription(xml: try control.inactiveXML(of: domain, place: name))
        }
        let expected = NovaMetadataTests.expected
        #expect(stored.nova == expected)
        #expect(virDomainCreate(defined) == 0, "start \(name)")
        let live = try #require(try control.domain(uuid: uuid, live: true))
        #expect(live.nova == expected)
        #expect(live.state.isActive)
    }
}
