/* libsystemd, the reference implementations of two systemd protocols:
 * - sd_notify(3): the service notification protocol (READY=1, RELOADING=1, STOPPING=1, STATUS=);
 * - sd_journal_sendv(3): the journal's native protocol (structured fields, priorities).
 * Only functions that are not variadic are used, so Swift imports them directly (sd_notifyf and
 * sd_journal_send are variadic and are not used). */
#include <systemd/sd-daemon.h>
#include <systemd/sd-journal.h>
