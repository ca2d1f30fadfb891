"""
A uid of its own for every job: the allocator, and the host look-ups it
needs.

Like systemd's C{DynamicUser=}, each job runs as an unprivileged uid (and
the gid of the same number) taken from a configured range, by default
systemd's own, 61184-65519.  The rules:

  - A uid is held by at most one live job.  It is taken when the job is
    accepted and given back when the job is final (which the job manager
    reaches once the job's cgroup is emptied and removed, or its PID
    namespace's init reaped), and even then handed out again only once no
    process on the host runs as it (see L{UidAllocator}).
  - A uid that names a user or group in the host's databases is never
    handed out: its files and processes belong to someone.
  - Uids are handed out round-robin, not lowest-first, so a uid just given
    back is the last to be reused: whatever its earlier job left behind in
    the kernel (a socket in TIME_WAIT, a key in a keyring) has the whole
    range's worth of starts to go away first.
  - Servers on one host claim the uids they hand out with a lock file each
    (L{UidLocks}), so that their ranges may overlap.
  - At start-up the server retires every uid of the range that a live
    process on the host still runs as (a job of an earlier server that is
    still alive, or any other user of the range); the uids of an earlier
    server's jobs whose processes are all gone are free.

The allocator itself is pure (no I/O): the host look-ups are passed in, so
its tests need no root.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from jobworker.errors import ErrorCode, RequestError

__all__ = [
    "DEFAULT_FIRST_UID",
    "DEFAULT_LAST_UID",
    "UidRange",
    "UidAllocator",
    "UidsExhausted",
    "UidLocks",
    "parse_uid_range",
    "host_has_id",
    "host_live_uids",
]

# systemd's DynamicUser= range (systemd.exec(5)): free on every distribution
# that follows systemd's uid allocation rules.
DEFAULT_FIRST_UID = 61184
DEFAULT_LAST_UID = 65519

# The highest uid we hand out: 65534 is "nobody" and 65535 the 16-bit -1;
# beyond 2**31 some tools misbehave.  Ranges may go up to this.
MAX_UID = 2**31 - 2


class UidsExhausted(RequestError):
    """
    Every uid of the range is held: the job cannot start.
    """

    code = ErrorCode.START_FAILED


@dataclass(frozen=True)
class UidRange:
    """
    An inclusive range of uids, C{first} to C{last}, at least one.
    """

    first: int = DEFAULT_FIRST_UID
    last: int = DEFAULT_LAST_UID

    def __post_init__(self) -> None:
        if not (1 <= self.first <= self.last <= MAX_UID):
            raise ValueError(f"uid range {self.first}-{self.last}: need 1 <= first <= last <= {MAX_UID}")

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid <= self.last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def parse_uid_range(text: str) -> UidRange:
    """
    Parse C{"FIRST-LAST"} (inclusive) or a single C{"UID"}.

    @raise ValueError: with a message fit for the user.
    """
    first, sep, last = text.strip().partition("-")
    try:
        low = int(first)
        high = int(last) if sep else low
    except ValueError:
        raise ValueError(f"{text!r} is not a uid range (example: 61184-65519)") from None
    return UidRange(low, high)


class UidAllocator:
    """
    Which uid of a range each live job holds, and which wait for proof that
    their processes are gone.

    A uid is in one of three states: I{held} by a live job, I{retired}
    (its job has ended, or a process from before this server runs as it)
    or free.  A job's end retires its uid rather than freeing it: the uid is
    handed out again only after a look at the host's processes
    (C{live_uids}) shows that none runs as it any more.  That look is taken
    when no free uid is left, so it costs one scan of C{/proc} per
    C{len(range)} starts, not one per start; round-robin allocation makes
    retired uids the last candidates anyway.  Whatever the way a job's
    processes end (cgroup kill, PID namespace, or a job without either whose
    processes escaped), its uid is never shared with a live one.

    @param is_taken: whether a uid belongs to a user or group of the host
        (asked for each candidate, at allocation).
    @param live_uids: the uids of the range that some process on the host
        runs as (asked at start-up and when the range runs out).
    @param claim: take a candidate uid for this server alone, or say that
        another server on the host holds it (L{UidLocks}); called for the
        uid about to be handed out.
    @param unclaim: give a claimed uid back, when its job ends.
    """

    def __init__(
        self,
        uids: UidRange,
        *,
        is_taken: Callable[[int], bool] = lambda uid: False,
        live_uids: Callable[[UidRange], Iterable[int]] = lambda uids: (),
        claim: Callable[[int], bool] = lambda uid: True,
        unclaim: Callable[[int], None] = lambda uid: None,
    ) -> None:
        self.range = uids
        self._is_taken = is_taken
        self._live_uids = live_uids
        self._claim = claim
        self._unclaim = unclaim
        self._holders: dict[int, str] = {}
        self._retired: set[int] = set()
        self._next = uids.first

    @property
    def holders(self) -> dict[int, str]:
        """
        uid -> the job that holds it.
        """
        return dict(self._holders)

    def holder_of(self, uid: int) -> str | None:
        return self._holders.get(uid)

    @property
    def retired(self) -> frozenset[int]:
        """
        The uids waiting for proof that no process runs as them.
        """
        return frozenset(self._retired)

    def retire_lingering(self) -> set[int]:
        """
        Retire every uid of the range that a live process runs as; called
        once, at start-up, before the first allocation.  Returns those uids.
        """
        found = {uid for uid in self._live_uids(self.range) if uid in self.range and uid not in self._holders}
        self._retired |= found
        return found

    def allocate(self, holder: str) -> int:
        """
        A free uid for C{holder}.

        @raise UidsExhausted: every uid is held, or retired with a process
            still running as it; the message names the range and the
            option that widens it.
        """
        uid = self._scan()
        if uid is None and self._retired:
            self._retired &= set(self._live_uids(self.range))
            uid = self._scan()
        if uid is None:
            raise UidsExhausted(
                f"no free uid to run the job as: all {len(self.range)} uids of the job uid range "
                f"{self.range} are in use ({len(self._holders)} by running jobs, {len(self._retired)} "
                "by processes still alive, the rest by host users or groups or another server's jobs); "
                "wait for a job to end or widen --job-uids"
            )
        self._holders[uid] = holder
        self._next = uid + 1 if uid < self.range.last else self.range.first
        return uid

    def _scan(self) -> int | None:
        """
        The first free uid at or after the cursor, wrapping once; None if
        there is none.  O(1) while most of the range is free, O(range) when
        it is nearly used up.
        """
        size = len(self.range)
        first, cursor = self.range.first, self._next - self.range.first
        for step in range(size):
            uid = first + (cursor + step) % size
            if uid not in self._holders and uid not in self._retired and not self._is_taken(uid) and self._claim(uid):
                return uid
        return None

    def adopt(self, uid: int, holder: str) -> None:
        """
        C{holder} holds C{uid} already: a job of an earlier server, taken
        back (its claim is renewed by the caller).
        """
        self._retired.discard(uid)
        self._holders[uid] = holder

    def release(self, uid: int) -> None:
        """
        The job holding C{uid} has ended: retire the uid until no process
        runs as it.
        """
        if self._holders.pop(uid, None) is not None:
            self._retired.add(uid)
            self._unclaim(uid)

    def forget(self, uid: int) -> None:
        """
        Free C{uid} at once: nothing ever ran as it (a start refused before
        its helper was spawned).
        """
        if self._holders.pop(uid, None) is not None:
            self._unclaim(uid)


# -- host look-ups ---------------------------------------------------------------


# Where servers on one host record which uid each has handed out: on /run,
# a tmpfs emptied at boot, like systemd's /run/systemd/dynamic-uid/.
DEFAULT_LOCK_DIRECTORY = "/run/jobworker/uids"


class UidLocks:
    """
    One lock file per uid handed out, so that two servers on one host never
    give the same uid to two live jobs, even with ranges that overlap.

    A uid is claimed with an exclusive C{flock(2)} on C{DIRECTORY/UID}, held
    (an open descriptor) while its job runs and dropped when it ends, when
    its processes are gone (its cgroup emptied, or its PID namespace
    reaped); a server that dies drops all of its own with it.  (Without a
    cgroup and without namespaces, processes that escaped a job are guarded
    against by the allocator of their own server only.)  A claim costs an
    C{open} and a C{flock}, some microseconds; one descriptor per running
    job.
    """

    def __init__(self, directory: str = DEFAULT_LOCK_DIRECTORY) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._held: dict[int, int] = {}

    def claim(self, uid: int) -> bool:
        """
        Take C{uid} for this server; False if another server holds it.

        @raise OSError: the lock file cannot be made (a start then fails).
        """
        if uid in self._held:
            return True
        path = os.path.join(self.directory, str(uid))
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # The holder unlinks the file before it lets go: a lock on a
                # file that is no longer (or no longer this one) at the path
                # is no claim, so take the path's file afresh.
                held = os.fstat(fd)
                try:
                    current = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    current = None
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                self._held[uid] = fd
                return True
            os.close(fd)

    def unclaim(self, uid: int) -> None:
        fd = self._held.pop(uid, None)
        if fd is not None:
            # Unlinked while still locked (see claim), so nothing is left.
            try:
                os.unlink(os.path.join(self.directory, str(uid)))
            except FileNotFoundError:
                pass
            os.close(fd)

    def close(self, leave: Iterable[int] = ()) -> None:
        """
        Give back every claim; those of C{leave} (the uids of jobs left
        running for the next server) keep their files, which that server
        claims again.
        """
        left = set(leave)
        for uid in list(self._held):
            if uid in left:
                os.close(self._held.pop(uid))
            else:
                self.unclaim(uid)

    def sweep(self) -> list[int]:
        """
        Remove the lock files that no live server holds: those of servers
        that died (a crash cannot unlink them), whichever their range.
        Called at start-up; returns the uids whose files went.

        Safe against servers claiming meanwhile: a file is unlinked only
        while locked, and only if it is still the one at its path, as in
        L{unclaim}, so a claimer that raced us retries on a fresh file
        (see L{claim}).  At most one file per uid of the ranges in use.
        """
        swept: list[int] = []
        try:
            names = os.listdir(self.directory)
        except OSError:
            return swept
        for name in names:
            if not name.isdigit() or int(name) in self._held:
                continue
            path = os.path.join(self.directory, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue  # gone meanwhile, or not a plain file of ours
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = os.fstat(fd)
                current = os.stat(path, follow_symlinks=False)
                if (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                    os.unlink(path)
                    swept.append(int(name))
            except OSError:
                pass  # held by a live server, or gone meanwhile
            finally:
                os.close(fd)
        return sorted(swept)


def host_has_id(uid: int) -> bool:
    """
    Whether C{uid} names a user, or the same number a group, in the host's
    databases (NSS: C{/etc/passwd}, C{/etc/group}, LDAP...).
    """
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    try:
        grp.getgrgid(uid)
        return True
    except KeyError:
        return False


def host_live_uids(uids: UidRange, proc: str = "/proc") -> set[int]:
    """
    The uids of C{uids} that a live process on the host has as its real,
    effective, saved or filesystem uid or gid (from C{/proc/PID/status}).

    Reads every process's status file: milliseconds on a busy host, so it is
    called at start-up and when the range runs out, never per job.
    """
    found: set[int] = set()
    try:
        entries = os.listdir(proc)
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/status", "rb") as status:
                text = status.read()
        except OSError:
            continue  # gone meanwhile
        for line in text.splitlines():
            if line.startswith((b"Uid:", b"Gid:")):
                found.update(int(n) for n in line.split()[1:] if int(n) in uids)
    return found
