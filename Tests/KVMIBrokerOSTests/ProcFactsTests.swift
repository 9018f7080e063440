import Testing

@testable import KVMIBrokerDaemon

@Suite("/proc facts: the start time and the process image")
struct ProcFactsTests {
    static func stat(comm: String, startTime: String) -> [UInt8] {
        // Fields 3 to 21, then 22 (the start time), then more.
        let middle = (3...21).map { $0 == 3 ? "S" : "\($0)" }.joined(separator: " ")
        return Array("4242 (\(comm)) \(middle) \(startTime) 23 24 25\n".utf8)
    }

    @Test("field 22 is counted after the last ')', whatever the command name holds")
    func startTime() {
        #expect(PeerVerifier.startTime(stat: Self.stat(comm: "qemu-system-x86", startTime: "987654321")) == 987_654_321)
        #expect(PeerVerifier.startTime(stat: Self.stat(comm: ") 1 2 3 (", startTime: "77")) == 77)
        #expect(PeerVerifier.startTime(stat: Self.stat(comm: "a b c d e f g h i j k l m n o p q r s t u v", startTime: "5")) == 5)
        #expect(PeerVerifier.startTime(stat: Self.stat(comm: "x", startTime: "99999999999999999999999")) == nil)
        #expect(PeerVerifier.startTime(stat: Self.stat(comm: "x", startTime: "")) == nil)
        #expect(PeerVerifier.startTime(stat: Array("4242 (x) S 1 2".utf8)) == nil)
        #expect(PeerVerifier.startTime(stat: Array("no parenthesis".utf8)) == nil)
    }

    @Test("the same image: start time, then device and inode, else the path")
    func sameImage() {
        let checked = ProcessFacts(startTime: 10, executable: "/usr/bin/qemu-system-x86_64", executableDevice: 1, executableInode: 2)
        var quick = checked
        quick.executable = ""
        #expect(quick.isSameImage(as: checked))
        var reused = quick
        reused.startTime = 11
        #expect(!reused.isSameImage(as: checked))
        var execd = quick
        execd.executableInode = 3
        #expect(!execd.isSameImage(as: checked))
        let noInode = ProcessFacts(startTime: 10, executable: "/usr/bin/qemu-system-x86_64", executableDevice: nil, executableInode: nil)
        #expect(noInode.isSameImage(as: checked))
        var noInodeNoPath = noInode
        noInodeNoPath.executable = ""
        #expect(!noInodeNoPath.isSameImage(as: checked))
    }
}
