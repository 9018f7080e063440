import KVMIBrokerCore
import Testing

@testable import KVMIBrokerLibvirt

/// A domain as libvirt's QEMU driver prints it (`virsh dumpxml --inactive`), trimmed.
let qemuDomainXML = """
    <domain type='kvm'>
      <name>web1</name>
      <uuid>82eb9fc6-e462-4d71-b39b-e91b90777f08</uuid>
      <memory unit='KiB'>65536</memory>
      <vcpu placement='static'>1</vcpu>
      <os>
        <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
      </os>
      <devices>
        <emulator>/usr/bin/qemu-system-x86_64</emulator>
        <memballoon model='none'/>
      </devices>
    </domain>
    """

@Suite struct MarkupTests {
    @Test func roundTripKeepsLayoutAndEscapes() throws {
        let text = "<a x=\"1 &amp; 2\" y='&lt;&quot;&#65;'>\n  <b>t &gt; &amp;</b>\n  <!-- c -->\n  <c/>\n</a>"
        let root = try MarkupElement.parse("<?xml version='1.0'?>\n" + text + "\n")
        #expect(root[attribute: "x"] == "1 & 2")
        #expect(root[attribute: "y"] == "<\"A")
        #expect(root.child("b")?.text == "t > &")
        #expect(root.serialized() == "<a x=\"1 &amp; 2\" y=\"&lt;&quot;A\">\n  <b>t &gt; &amp;</b>\n  <!-- c -->\n  <c/>\n</a>")
        #expect(try MarkupElement.parse(root.serialized()) == root)
        #expect(root.canonical() == "<a x=\"1 &amp; 2\" y=\"&lt;&quot;A\"><b>t &gt; &amp;</b><c/></a>")
    }

    @Test(arguments: [
        "<a>", "<a></b>", "<a x=1/>", "<a x='1' x='2'/>", "<!DOCTYPE a [<!ENTITY e 'x'>]><a>&e;</a>", "<a>&bogus;</a>", "<a/><b/>",
        "text", "", "<a x='1'y='2'/>", "<a><![CDATA[x</a>",
    ])
    func malformedIsRefused(_ text: String) {
        #expect(throws: BrokerError.self) { try MarkupElement.parse(text) }
    }

    @Test func depthIsBounded() {
        let deep = String(repeating: "<a>", count: 300) + String(repeating: "</a>", count: 300)
        #expect(throws: BrokerError.self) { try MarkupElement.parse(deep) }
    }
}

@Suite struct DomainDescriptionTests {
    @Test func hookStdinWithMetadataUnderAnyPrefix() throws {
        let xml = """
            <domain type='kvm' id='5'>
              <name>win10</name>
              <uuid>6695EB01-F6A4-8304-79AA-97F2502E193F</uuid>
              <metadata>
                <other:thing xmlns:other="urn:other"/>
                <x:introspection xmlns:x="https://kvmi-broker.org/xmlns/1" introspector="acme" required="yes"/>
              </metadata>
              <devices><emulator>/opt/kvmi/bin/qemu-system-x86_64</emulator></devices>
            </domain>
            """
        let domain = try DomainDescription(xml: xml)
        #expect(domain.name == "win10")
        #expect(domain.uuid == GuestUUID("6695eb01-f6a4-8304-79aa-97f2502e193f"))
        #expect(domain.id == 5)
        #expect(domain.emulator == "/opt/kvmi/bin/qemu-system-x86_64")
        #expect(domain.metadata == IntrospectionMetadata(introspector: "acme", required: true))
    }

    @Test("the DAC label of a running domain's live XML: the domain's, not a disk's; user:group or +uid:+gid")
    func dacLabelFromLiveXML() throws {
        let live = """
            <domain type='kvm' id='7'>
              <name>web</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>
              <devices>
                <emulator>/usr/bin/qemu-system-x86_64</emulator>
                <disk type='file'><source file='/x.img'><seclabel model='dac' relabel='yes'><label>+5:+5</label></seclabel></source></disk>
              </devices>
              <seclabel type='dynamic' model='apparmor' relabel='yes'><label>libvirt-6695eb01</label></seclabel>
              <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+994</label><imagelabel>+64055:+994</imagelabel></seclabel>
            </domain>
            """
        let domain = try DomainDescription(xml: live)
        #expect(domain.processLabel == DACLabel(user: "+64055", group: "+994"))
        #expect(domain.emulator == "/usr/bin/qemu-system-x86_64")
        #expect(DACLabel(" libvirt-qemu:kvm ") == DACLabel(user: "libvirt-qemu", group: "kvm"))
        #expect(DACLabel("root") == nil && DACLabel(":kvm") == nil && DACLabel("root:") == nil)
        let none = try DomainDescription(xml: "<domain><name>t</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid></domain>")
        #expect(none.processLabel == nil && none.emulator == nil)
    }

    @Test func elementInAnotherNamespaceIsNotOurs() throws {
        let xml = """
            <domain><name>a</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>
            <metadata><kvmi:introspection xmlns:kvmi="https://example.org/other" required="yes"/></metadata></domain>
            """
        let domain = try DomainDescription(xml: xml)
        #expect(domain.metadata == nil)
        #expect(domain.id == nil)
    }

    @Test func errorsNameTheDomain() {
        let bad = """
            <domain><name>db7</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>
            <metadata><kvmi:introspection xmlns:kvmi="https://kvmi-broker.org/xmlns/1" required="maybe"/></metadata></domain>
            """
        #expect {
            try DomainDescription(xml: bad)
        } throws: { error in
            (error as? BrokerError)?.description == "domain db7: <kvmi:introspection required=\"maybe\">: required must be yes or no"
        }
        #expect(throws: BrokerError.self) { try DomainDescription(xml: "<domain><name>x</name><uuid>nope</uuid></domain>") }
        #expect(throws: BrokerError.self) { try DomainDescription(xml: "<network><name>x</name></network>") }
    }

    @Test func metadataStringFromVirDomainGetMetadata() throws {
        // libvirt returns the element without its prefix.
        #expect(try IntrospectionMetadata(metadataString: "<introspection required=\"yes\"/>") == IntrospectionMetadata(required: true))
        #expect(try IntrospectionMetadata(metadataString: "<introspection wanted='no'/>").wanted == false)
        #expect(
            IntrospectionMetadata(introspector: "acme", required: true).setMetadataString == "<introspection introspector=\"acme\" required=\"yes\"/>"
        )
    }

    @Test("uuid, name and our element by namespace URI whatever its prefix; decoys and entities")
    func domainXML() throws {
        let xml = """
            <domain type='kvm' id='3'>
              <name>prod-win-7</name>
              <uuid>6695EB01-F6A4-8304-79AA-97F2502E193F</uuid>
              <metadata>
                <other:thing xmlns:other="https://example.com/x"><name>decoy</name></other:thing>
                <k:introspection xmlns:k="https://kvmi-broker.org/xmlns/1" introspector="acme" required="yes"/>
              </metadata>
              <devices><disk><name>not-the-domain</name></disk></devices>
            </domain>
            """
        let facts = try DomainDescription(xml: xml)
        #expect(facts.name == "prod-win-7")
        #expect(facts.uuid == GuestUUID("6695eb01-f6a4-8304-79aa-97f2502e193f"))
        #expect(facts.metadata?.introspector == "acme" && facts.metadata?.required == true && facts.metadata?.wanted == true)
        let wrongNamespace = try DomainDescription(
            xml:
                "<domain><name>a&amp;b</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid><metadata><introspection xmlns='urn:other'/></metadata></domain>"
        )
        #expect(wrongNamespace.name == "a&b")
        #expect(wrongNamespace.metadata == nil)
        #expect(throws: BrokerError.self) { try DomainDescription(xml: "<domain><uuid>nope</uuid></domain>") }
        #expect(throws: BrokerError.self) { try DomainDescription(xml: "<network><name>x</name></network>") }
    }
}

@Suite struct EnrollmentTests {
    @Test func enrollAddsExactlyOurPieces() throws {
        let options = try EnrollmentOptions(introspector: "acme", required: true, channelSocket: "/run/kvmi-broker/qemu.sock")
        let edit = try Enrollment.enroll(MarkupElement.parse(qemuDomainXML), options: options)
        #expect(edit.metadataChanged && edit.definitionChanged)
        #expect(
            edit.domain.serialized() == """
                <domain type="kvm" xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0">
                  <name>web1</name>
                  <uuid>82eb9fc6-e462-4d71-b39b-e91b90777f08</uuid>
                  <metadata>
                    <kvmi:introspection xmlns:kvmi="https://kvmi-broker.org/xmlns/1" introspector="acme" required="yes"/>
                  </metadata>
                  <memory unit="KiB">65536</memory>
                  <vcpu placement="static">1</vcpu>
                  <os>
                    <type arch="x86_64" machine="pc-i440fx-7.2">hvm</type>
                  </os>
                  <devices>
                    <emulator>/usr/bin/qemu-system-x86_64</emulator>
                    <memballoon model="none"/>
                  </devices>
                  <qemu:commandline>
                    <qemu:arg value="-chardev"/>
                    <qemu:arg value="socket,id=kvmib0,path=/run/kvmi-broker/qemu.sock,reconnect-ms=1000"/>
                    <qemu:arg value="-object"/>
                    <qemu:arg value="introspection-broker,id=kvmib-vmi0,chardev=kvmib0,required=on"/>
                  </qemu:commandline>
                </domain>
                """)
        #expect(
            edit.changes == [
                "metadata: added <kvmi:introspection xmlns:kvmi=\"https://kvmi-broker.org/xmlns/1\" introspector=\"acme\" required=\"yes\"/>",
                "qemu:commandline: added -chardev socket,id=kvmib0,path=/run/kvmi-broker/qemu.sock,reconnect-ms=1000 -object introspection-broker,id=kvmib-vmi0,chardev=kvmib0,required=on",
            ])
        let description = try DomainDescription(root: edit.domain)
        #expect(description.enrolledChannelSocket == "/run/kvmi-broker/qemu.sock")
        #expect(description.metadata == IntrospectionMetadata(introspector: "acme", required: true))
    }

    @Test func enrollTwiceChangesNothingAndUnenrollRestores() throws {
        let original = try MarkupElement.parse(qemuDomainXML)
        let options = try EnrollmentOptions(introspector: "acme", emulator: "/opt/kvmi/bin/qemu-system-x86_64")
        let first = try Enrollment.enroll(original, options: options)
        #expect(first.changes.contains("emulator: /usr/bin/qemu-system-x86_64 -> /opt/kvmi/bin/qemu-system-x86_64"))
        #expect(first.metadata?.originalEmulator == "/usr/bin/qemu-system-x86_64")
        // libvirt reformats what it is given: the second pass sees its own layout.
        let reformatted = try MarkupElement.parse(first.domain.canonical())
        let second = try Enrollment.enroll(reformatted, options: options)
        #expect(!second.changed)
        #expect(second.changes.isEmpty)
        let removed = try Enrollment.unenroll(first.domain)
        #expect(removed.domain.serialized() == original.serialized())
        #expect(removed.changes.contains("emulator: /opt/kvmi/bin/qemu-system-x86_64 -> /usr/bin/qemu-system-x86_64"))
        #expect(!(try Enrollment.unenroll(removed.domain)).changed)
    }

    @Test func changedOptionsReplaceOurLinesAndKeepOthers() throws {
        let xml = qemuDomainXML.replacingOccurrences(
            of: "</domain>",
            with: """
                  <qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
                    <qemu:arg value='-s'/>
                  </qemu:commandline>
                </domain>
                """)
        // The namespace is declared on <domain> in libvirt's output; move it there.
        var root = try MarkupElement.parse(xml)
        root[attribute: "xmlns:qemu"] = QEMUCommandLine.namespace
        let first = try Enrollment.enroll(root, options: EnrollmentOptions(channelSocket: "/run/a,b.sock"))
        #expect(QEMUCommandLine.ourArguments(in: first.domain)[1] == "socket,id=kvmib0,path=/run/a,,b.sock,reconnect-ms=1000")
        let second = try Enrollment.enroll(first.domain, options: EnrollmentOptions(required: true, channelSocket: "/run/a,b.sock"))
        #expect(!second.metadataChanged || second.metadata?.required == true)
        #expect(second.definitionChanged)
        let args = second.domain.child("qemu:commandline")?.elements.compactMap { $0[attribute: "value"] }
        #expect(args?.first == "-s")
        #expect(args?.last == "introspection-broker,id=kvmib-vmi0,chardev=kvmib0,required=on")
        let removed = try Enrollment.unenroll(second.domain)
        #expect(removed.domain.child("qemu:commandline")?.elements.compactMap { $0[attribute: "value"] } == ["-s"])
        #expect(removed.domain[attribute: "xmlns:qemu"] == QEMUCommandLine.namespace)
    }

    @Test func foreignIntrospectionObjectIsAConflict() throws {
        var root = try MarkupElement.parse(
            qemuDomainXML.replacingOccurrences(
                of: "</domain>",
                with:
                    "<qemu:commandline><qemu:arg value='-object'/><qemu:arg value='introspection-broker,id=vmi0,chardev=c'/></qemu:commandline></domain>"
            ))
        root[attribute: "xmlns:qemu"] = QEMUCommandLine.namespace
        #expect {
            try Enrollment.enroll(root, options: EnrollmentOptions())
        } throws: { error in
            (error as? BrokerError)?.location == "domain web1"
        }
    }

    @Test func optionsAreValidated() {
        #expect(throws: BrokerError.self) { try EnrollmentOptions(emulator: "qemu") }
        #expect(throws: BrokerError.self) { try EnrollmentOptions(channelSocket: "relative.sock") }
        #expect(throws: BrokerError.self) { try EnrollmentOptions(introspector: "") }
    }
}
