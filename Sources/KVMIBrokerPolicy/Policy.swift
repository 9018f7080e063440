import KVMIBrokerCore

/// Placeholder so the target builds; the policy engine replaces this file.
public enum PolicyPlaceholder {}
