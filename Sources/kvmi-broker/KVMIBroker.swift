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
    /// arenas made before the limit stay, and glibc hands them out again to threads started
    /// later, so the call `run` used to make (on a pool thread with an arena of its own) left the
    /// reactor's thread on that arena or not, depending on timing. See `useOneMallocArena`.
    static func main() async {
        useOneMallocArena()
        await main(nil)
    }
}
