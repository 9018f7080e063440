import ArgumentParser
import KVMIBrokerCore
import KVMIBrokerOS

/// kvmi-broker: connects introspected guests to their introspection tools.
@main
struct KVMIBroker: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvmi-broker",
        abstract: "Connects KVM guests to VM-introspection tools: policy, handshake, and the hand-over to KVM through QEMU.",
        discussion: """
            On a host: write the allow-policy (/etc/kvmi-broker, see `kvmi-broker policy check`), enroll each \
            domain (`kvmi-broker enroll`), install the libvirt hook (`kvmi-broker install-hook`), start the daemon \
            (`kvmi-broker run`) and watch it (`kvmi-broker status`). Introspector vendors test their endpoint with \
            `kvmi-broker probe`.
            """,
        version: BrokerVersion.string,
        subcommands: [
            RunCommand.self, StatusCommand.self, DrainCommand.self, UndrainCommand.self, ProbeCommand.self, PolicyCommand.self, EnrollCommand.self,
            UnenrollCommand.self, HookCommand.self,
            InstallHookCommand.self,
        ])

    /// Limits glibc to one malloc arena while this is still the only thread that allocates:
    /// glibc fixes the arena limit the first time a second thread allocates, so a later call
    /// (as `run` made it) takes effect or not depending on whether one of Swift's pool threads
    /// allocated first. See `useOneMallocArena`.
    static func main() async {
        useOneMallocArena()
        await main(nil)
    }
}
