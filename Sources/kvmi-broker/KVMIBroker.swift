import ArgumentParser

/// kvmi-broker: connects introspected guests to their introspection tools.
@main
struct KVMIBroker: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvmi-broker",
        abstract: "Connects KVM guests to VM-introspection tools: policy, handshake, and the hand-over to KVM through QEMU.",
        subcommands: [
            RunCommand.self, StatusCommand.self, ProbeCommand.self, PolicyCommand.self, EnrollCommand.self, UnenrollCommand.self, HookCommand.self,
            InstallHookCommand.self,
        ])
}
