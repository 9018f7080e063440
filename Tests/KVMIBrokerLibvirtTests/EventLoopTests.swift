import Foundation
import Testing

@testable import KVMIBrokerLibvirt

#if canImport(Glibc)
    import Glibc
#endif

@Suite("libvirt's event loop")
struct EventLoopTests {
    /// libvirt's client writes to its socket with write(2); a libvirtd restart turned the next
    /// write into a SIGPIPE that killed the test process once (the daemon ignored it already).
    @Test("starting it ignores SIGPIPE, so a libvirtd that goes away cannot kill the process")
    func ignoresSIGPIPE() {
        #expect(LibvirtEventLoop.start())
        var current = sigaction()
        #expect(sigaction(SIGPIPE, nil, &current) == 0)
        #expect(unsafeBitCast(current.__sigaction_handler.sa_handler, to: Int.self) == unsafeBitCast(SIG_IGN, to: Int.self))
    }
}
