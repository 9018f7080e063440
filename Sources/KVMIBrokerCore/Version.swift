/// The broker's version: the one place it is written. `kvmi-broker --version`, the status
/// file, `kvmi-bench` and `scripts/version` (packaging) read it from here.
public enum BrokerVersion {
    public static let string = "0.9.0"
    /// The date the man pages carry (`scripts/man`): changed with the version, so that
    /// regenerating them gives the same bytes on any day.
    public static let date = "2026-12-03"
}
