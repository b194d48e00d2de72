//! faultfs through a real FUSE mount: durability model, power loss, tearing, fault rules,
//! control protocol, and mount lifecycle (including a SIGKILLed server process).
//!
//! These need root and /dev/fuse; when mounting is impossible they fail, saying so.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_faultfs::{control, status, FaultFsError, Mount, Status};

struct Env {
    backing: PathBuf,
    mnt: PathBuf,
    ctl: PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mnt).unwrap();
        Self {
            ctl: dir.path().join("ctl.sock"),
            backing,
            mnt,
            _dir: dir,
        }
    }

    fn mount(&self) -> Mount {
        Mount::start(&self.backing, &self.mnt, &self.ctl)
            .unwrap_or_else(|e| panic!("faultfs could not mount: {e}"))
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Power loss through the control socket, unmount, mount again.
    fn power_cycle(&self, m: Mount) -> Mount {
        let answer = cmd(&m, "power-loss");
        assert!(answer.starts_with("power lost"), "{answer}");
        m.shutdown().expect("unmount after power loss");
        self.mount()
    }

    fn graveyard_entries(&self) -> usize {
        fs::read_dir(self.backing.join(ferry_faultfs::GRAVEYARD))
            .unwrap()
            .count()
    }
}

fn cmd(m: &Mount, line: &str) -> String {
    control(m.control_path(), line).unwrap_or_else(|e| panic!("{line}: {e}"))
}

fn fsync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

/// Creates `path` with `data`, fsyncs it and its directory.
fn durable_file(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    fsync_dir(path.parent().unwrap());
}

fn assert_errno<T: std::fmt::Debug>(res: io::Result<T>, errno: i32, what: &str) {
    match res {
        Err(e) => assert_eq!(e.raw_os_error(), Some(errno), "{what}: {e}"),
        Ok(v) => panic!("{what}: expected errno {errno}, got Ok({v:?})"),
    }
}

fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn append(path: &Path, data: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(data)
        .unwrap();
}

#[test]
fn fsynced_data_survives_power_loss_and_remount() {
    let env = Env::new();
    let m = env.mount();
    let f = env.p("wal.log");
    durable_file(&f, b"committed");
    let m = env.power_cycle(m);
    assert_eq!(fs::read(&f).unwrap(), b"committed");
    assert_eq!(fs::read(env.backing.join("wal.log")).unwrap(), b"committed");
    assert_eq!(
        m.status(),
        Status::default(),
        "nothing pending after a remount"
    );
}

#[test]
fn unsynced_data_is_lost_back_to_the_last_fsync() {
    let env = Env::new();
    let m = env.mount();
    let f = env.p("data");
    durable_file(&f, b"0123456789");
    // Appends, overwrites, a shrink, a fallocate growth and an O_TRUNC: none fsynced.
    append(&f, b"abcdef");
    let h = OpenOptions::new().read(true).write(true).open(&f).unwrap();
    h.write_all_at(b"XY", 2).unwrap();
    h.write_all_at(b"far", 100).unwrap();
    h.set_len(5).unwrap();
    assert_eq!(unsafe { libc::fallocate(h.as_raw_fd(), 0, 0, 8192) }, 0);
    assert_eq!(h.metadata().unwrap().len(), 8192);
    drop(h);
    File::create(&f).unwrap().write_all(b"new").unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"new");
    let _m = env.power_cycle(m);
    assert_eq!(fs::metadata(&f).unwrap().len(), 10);
    assert_eq!(fs::read(&f).unwrap(), b"0123456789");
}

#[test]
fn fdatasync_and_o_dsync_count_as_fsync() {
    let env = Env::new();
    let m = env.mount();
    let f = env.p("f");
    durable_file(&f, b"");
    let mut h = OpenOptions::new().append(true).open(&f).unwrap();
    h.write_all(b"datasync").unwrap();
    h.sync_data().unwrap();
    drop(h);
    let g = env.p("g");
    durable_file(&g, b"");
    let mut h = OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_DSYNC)
        .open(&g)
        .unwrap();
    h.write_all(b"o_dsync").unwrap();
    drop(h);
    assert_eq!(m.status().unsynced_files, 0);
    let _m = env.power_cycle(m);
    assert_eq!(fs::read(&f).unwrap(), b"datasync");
    assert_eq!(fs::read(&g).unwrap(), b"o_dsync");
}

#[test]
fn msync_of_a_shared_map_is_an_fsync() {
    let env = Env::new();
    let m = env.mount();
    let f = env.p("mapped");
    durable_file(&f, &[0u8; 4096]);
    let h = OpenOptions::new().read(true).write(true).open(&f).unwrap();
    unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            h.as_raw_fd(),
            0,
        );
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        std::ptr::copy_nonoverlapping(b"mapped".as_ptr(), ptr.cast::<u8>(), 6);
        assert_eq!(libc::msync(ptr, 4096, libc::MS_SYNC), 0);
        libc::munmap(ptr, 4096);
    }
    drop(h);
    let _m = env.power_cycle(m);
    assert_eq!(&fs::read(&f).unwrap()[..7], b"mapped\0");
}

#[test]
fn sync_file_range_makes_nothing_durable() {
    let env = Env::new();
    let m = env.mount();
    let f = env.p("sled.db");
    durable_file(&f, b"old");
    let fsyncs = m.status().fsyncs;
    let mut h = OpenOptions::new().write(true).open(&f).unwrap();
    h.write_all(b"NEW-DATA").unwrap();
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    let ret = unsafe { libc::sync_file_range(h.as_raw_fd(), 0, 0, flags) };
    assert_eq!(ret, 0, "sync_file_range: {}", io::Error::last_os_error());
    drop(h);
    let st = m.status();
    assert_eq!(
        st.fsyncs, fsyncs,
        "sync_file_range never reaches the daemon"
    );
    assert_eq!(st.unsynced_files, 1);
    let _m = env.power_cycle(m);
    assert_eq!(fs::read(&f).unwrap(), b"old");
}

#[test]
fn a_new_file_needs_its_directory_fsynced() {
    let env = Env::new();
    let m = env.mount();
    // Data and directory fsynced: it stays.
    let kept = env.p("kept.txt");
    durable_file(&kept, b"data");
    // From here on the root directory is never fsynced again.
    // Data fsynced, directory not: the file vanishes.
    let lost = env.p("lost.txt");
    let mut h = File::create(&lost).unwrap();
    h.write_all(b"data").unwrap();
    h.sync_all().unwrap();
    drop(h);
    // A directory whose own entry was never fsynced takes its synced contents with it.
    fs::create_dir(env.p("sub")).unwrap();
    durable_file(&env.p("sub/inner"), b"x");
    // Symlinks and hard links are directory entries too.
    std::os::unix::fs::symlink("kept.txt", env.p("sym")).unwrap();
    fs::hard_link(&kept, env.p("hard")).unwrap();
    assert_eq!(fs::read(env.p("hard")).unwrap(), b"data");
    assert_eq!(
        fs::read_link(env.p("sym")).unwrap(),
        PathBuf::from("kept.txt")
    );
    assert_eq!(m.status().unsynced_dir_ops, 4);
    let _m = env.power_cycle(m);
    assert!(!lost.exists());
    assert_eq!(fs::read(&kept).unwrap(), b"data");
    assert!(!env.p("sub").exists());
    assert!(fs::symlink_metadata(env.p("sym")).is_err());
    assert!(!env.p("hard").exists());
    assert_eq!(fs::metadata(&kept).unwrap().nlink(), 1);
}

#[test]
fn rename_without_directory_fsync_reverts() {
    let env = Env::new();
    let m = env.mount();
    durable_file(&env.p("a"), b"A");
    durable_file(&env.p("b"), b"B");
    for d in ["d1", "d2", "d3", "d4"] {
        fs::create_dir(env.p(d)).unwrap();
    }
    fsync_dir(&env.mnt);
    durable_file(&env.p("d1/x"), b"X");
    durable_file(&env.p("d3/z"), b"Z");

    // Overwriting rename, no fsync at all.
    fs::rename(env.p("a"), env.p("b")).unwrap();
    assert_eq!(fs::read(env.p("b")).unwrap(), b"A");
    assert!(!env.p("a").exists());
    // Across directories, only the target fsynced.
    fs::rename(env.p("d1/x"), env.p("d2/y")).unwrap();
    fsync_dir(&env.p("d2"));
    // Across directories, both fsynced: durable.
    fs::rename(env.p("d3/z"), env.p("d4/z")).unwrap();
    fsync_dir(&env.p("d3"));
    fsync_dir(&env.p("d4"));

    // RENAME_EXCHANGE, no fsync.
    durable_file(&env.p("d4/p"), b"P");
    durable_file(&env.p("d4/q"), b"Q");
    let (p, q) = (cpath(&env.p("d4/p")), cpath(&env.p("d4/q")));
    let ret = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            p.as_ptr(),
            libc::AT_FDCWD,
            q.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(ret, 0, "exchange: {}", io::Error::last_os_error());
    assert_eq!(fs::read(env.p("d4/p")).unwrap(), b"Q");

    let _m = env.power_cycle(m);
    assert_eq!(fs::read(env.p("d4/p")).unwrap(), b"P");
    assert_eq!(fs::read(env.p("d4/q")).unwrap(), b"Q");
    assert_eq!(fs::read(env.p("a")).unwrap(), b"A");
    assert_eq!(fs::read(env.p("b")).unwrap(), b"B");
    assert_eq!(fs::read(env.p("d1/x")).unwrap(), b"X");
    assert!(!env.p("d2/y").exists());
    assert_eq!(fs::read(env.p("d4/z")).unwrap(), b"Z");
    assert!(!env.p("d3/z").exists());
    assert_eq!(env.graveyard_entries(), 0);
}

#[test]
fn write_fsync_rename_fsync_dir_replaces_atomically() {
    let env = Env::new();
    let m = env.mount();
    for d in ["done", "undone"] {
        fs::create_dir(env.p(d)).unwrap();
        fsync_dir(&env.mnt);
        durable_file(&env.p(&format!("{d}/checkpoint")), b"v1");
        let tmp = env.p(&format!("{d}/checkpoint.tmp"));
        let mut h = File::create(&tmp).unwrap();
        h.write_all(b"v2").unwrap();
        h.sync_all().unwrap();
        drop(h);
        fs::rename(&tmp, env.p(&format!("{d}/checkpoint"))).unwrap();
        if d == "done" {
            fsync_dir(&env.p(d));
        }
    }
    let _m = env.power_cycle(m);
    assert_eq!(fs::read(env.p("done/checkpoint")).unwrap(), b"v2");
    assert!(!env.p("done/checkpoint.tmp").exists());
    assert_eq!(fs::read(env.p("undone/checkpoint")).unwrap(), b"v1");
    assert!(!env.p("undone/checkpoint.tmp").exists());
}

#[test]
fn unlink_without_directory_fsync_reverts_with_durable_content() {
    let env = Env::new();
    let m = env.mount();
    for d in ["pending", "synced"] {
        fs::create_dir(env.p(d)).unwrap();
    }
    fsync_dir(&env.mnt);
    // Removals in `pending` are never made durable.
    fs::create_dir(env.p("pending/emptydir")).unwrap();
    let f = env.p("pending/f");
    durable_file(&f, b"durable");
    append(&f, b"+unsynced");
    let mut open = OpenOptions::new().read(true).write(true).open(&f).unwrap();
    fs::remove_file(&f).unwrap();
    assert!(!f.exists());
    // The open file still works after the unlink.
    open.seek(SeekFrom::End(0)).unwrap();
    open.write_all(b"!").unwrap();
    let mut all = String::new();
    open.seek(SeekFrom::Start(0)).unwrap();
    open.read_to_string(&mut all).unwrap();
    assert_eq!(all, "durable+unsynced!");
    drop(open);
    fs::remove_dir(env.p("pending/emptydir")).unwrap();
    assert_eq!(
        env.graveyard_entries(),
        2,
        "f and emptydir wait in the graveyard"
    );
    // A durable unlink: gone for good, its graveyard entry deleted at the directory fsync.
    let g = env.p("synced/g");
    durable_file(&g, b"g");
    fs::remove_file(&g).unwrap();
    assert_eq!(env.graveyard_entries(), 3);
    fsync_dir(&env.p("synced"));
    assert_eq!(env.graveyard_entries(), 2);
    let names: Vec<_> = fs::read_dir(&env.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "the graveyard is hidden: {names:?}");

    let _m = env.power_cycle(m);
    assert_eq!(fs::read(&f).unwrap(), b"durable");
    assert!(!g.exists());
    assert!(env.p("pending/emptydir").is_dir());
    assert_eq!(env.graveyard_entries(), 0);
}

#[test]
fn after_power_loss_every_operation_fails_with_eio() {
    let env = Env::new();
    let m = env.mount();
    let f = env.p("f");
    durable_file(&f, b"durable");
    let mut h = OpenOptions::new().read(true).write(true).open(&f).unwrap();
    cmd(&m, "power-loss");
    let mut buf = [0u8; 4];
    assert_errno(h.read(&mut buf), libc::EIO, "read");
    assert_errno(h.write(b"x"), libc::EIO, "write");
    assert_errno(h.sync_all(), libc::EIO, "fsync");
    assert_errno(h.set_len(0), libc::EIO, "ftruncate");
    drop(h);
    assert_errno(fs::metadata(&f), libc::EIO, "stat");
    assert_errno(File::open(&f), libc::EIO, "open");
    assert_errno(File::create(env.p("new")), libc::EIO, "create");
    assert_errno(fs::create_dir(env.p("dir")), libc::EIO, "mkdir");
    assert_errno(fs::read_dir(&env.mnt).map(|_| ()), libc::EIO, "readdir");
    assert_errno(fs::remove_file(&f), libc::EIO, "unlink");
    assert!(m.status().power_lost);
    assert_eq!(cmd(&m, "power-loss"), "power already lost");
    m.shutdown().expect("unmount after power loss");
    let _m = env.mount();
    assert_eq!(fs::read(&f).unwrap(), b"durable");
}

/// Writes 12 chunks to each of two durable files, tears with `seed`, returns what stayed.
fn torn(seed: u64) -> (Vec<u8>, Vec<u8>) {
    let env = Env::new();
    let m = env.mount();
    durable_file(&env.p("a"), b"base-a|");
    durable_file(&env.p("b"), b"base-b|");
    let mut a = OpenOptions::new().append(true).open(env.p("a")).unwrap();
    let mut b = OpenOptions::new().append(true).open(env.p("b")).unwrap();
    for (i, chunk) in chunks().iter().enumerate() {
        if i % 2 == 0 {
            a.write_all(chunk).unwrap();
        } else {
            b.write_all(chunk).unwrap();
        }
        a.write_all(chunk).unwrap();
        b.write_all(chunk).unwrap();
    }
    drop((a, b));
    let answer = cmd(&m, &format!("tear {seed}"));
    assert!(
        answer.starts_with(&format!("torn with seed {seed}")),
        "{answer}"
    );
    assert!(m.status().power_lost);
    m.shutdown().unwrap();
    (
        fs::read(env.backing.join("a")).unwrap(),
        fs::read(env.backing.join("b")).unwrap(),
    )
}

fn chunks() -> Vec<Vec<u8>> {
    (0..8u8).map(|i| vec![b'a' + i; 32]).collect()
}

fn full(base: &[u8], writer_even: bool) -> Vec<u8> {
    let mut out = base.to_vec();
    for (i, chunk) in chunks().iter().enumerate() {
        if (i % 2 == 0) == writer_even {
            out.extend_from_slice(chunk);
        }
        out.extend_from_slice(chunk);
    }
    out
}

#[test]
fn tear_keeps_a_seeded_prefix_of_unsynced_writes() {
    let full_a = full(b"base-a|", true);
    let full_b = full(b"base-b|", false);
    let mut lengths = std::collections::BTreeSet::new();
    for seed in 0..6 {
        let (a, b) = torn(seed);
        for (got, want, base) in [(&a, &full_a, 7), (&b, &full_b, 7)] {
            assert!(
                got.len() >= base && got.len() <= want.len(),
                "seed {seed}: {}",
                got.len()
            );
            assert_eq!(&want[..got.len()], &got[..], "seed {seed}: not a prefix");
            lengths.insert(got.len());
        }
        if seed < 2 {
            assert_eq!(torn(seed), (a, b), "seed {seed} tears the same way twice");
        }
    }
    assert!(lengths.len() > 2, "tears vary with the seed: {lengths:?}");
}

#[test]
fn fail_fsync_fails_n_times_and_keeps_nothing() {
    let env = Env::new();
    let m = env.mount();
    fs::create_dir(env.p("wal")).unwrap();
    fsync_dir(&env.mnt);
    let f = env.p("wal/seg.log");
    durable_file(&f, b"");
    let other = env.p("other");
    durable_file(&other, b"");
    assert_eq!(cmd(&m, "fail-fsync wal/*.log 2"), "fail-fsync wal/*.log 2");
    let mut h = OpenOptions::new().append(true).open(&f).unwrap();
    h.write_all(b"first").unwrap();
    assert_errno(h.sync_all(), libc::EIO, "fsync 1");
    assert_errno(h.sync_data(), libc::EIO, "fsync 2");
    // Other paths are not affected meanwhile.
    File::options()
        .append(true)
        .open(&other)
        .unwrap()
        .sync_all()
        .unwrap();
    drop(h);
    assert_eq!(m.status().fsyncs_failed, 2);
    let m = env.power_cycle(m);
    assert_eq!(
        fs::read(&f).unwrap(),
        b"",
        "a failed fsync makes nothing durable"
    );

    cmd(&m, "fail-fsync wal/*.log 1");
    let mut h = OpenOptions::new().append(true).open(&f).unwrap();
    h.write_all(b"second").unwrap();
    assert_errno(h.sync_all(), libc::EIO, "fsync 1");
    h.sync_all().expect("the rule ran out");
    drop(h);
    // `always` until `clear`, directories included.
    cmd(&m, "fail-fsync wal always");
    for _ in 0..3 {
        assert_errno(
            File::open(env.p("wal")).unwrap().sync_all(),
            libc::EIO,
            "fsyncdir",
        );
    }
    assert_eq!(cmd(&m, "clear"), "cleared 1 rule(s)");
    fsync_dir(&env.p("wal"));
    let _m = env.power_cycle(m);
    assert_eq!(fs::read(&f).unwrap(), b"second");
}

#[test]
fn enospc_refuses_and_changes_nothing() {
    let env = Env::new();
    let m = env.mount();
    let f = env.p("data.dat");
    durable_file(&f, b"keep");
    cmd(&m, "enospc *.dat 1");
    let mut h = OpenOptions::new().append(true).open(&f).unwrap();
    assert_errno(h.write(b"more"), libc::ENOSPC, "write");
    assert_eq!(fs::read(&f).unwrap(), b"keep");
    h.write_all(b"+ok").unwrap();
    drop(h);
    assert_eq!(fs::read(&f).unwrap(), b"keep+ok");

    cmd(&m, "enospc new* always");
    assert_errno(File::create(env.p("new1")), libc::ENOSPC, "create");
    assert!(!env.p("new1").exists());
    assert_errno(fs::create_dir(env.p("newdir")), libc::ENOSPC, "mkdir");
    assert!(!env.p("newdir").exists());

    let big = env.p("big");
    durable_file(&big, b"0123456789");
    cmd(&m, "enospc big always");
    let h = OpenOptions::new().write(true).open(&big).unwrap();
    assert_errno(h.set_len(1 << 20), libc::ENOSPC, "grow");
    assert_eq!(fs::metadata(&big).unwrap().len(), 10);
    h.set_len(4).expect("shrinking takes no space");
    drop(h);
    assert_eq!(m.status().enospc, 4);
    cmd(&m, "clear");
    File::create(env.p("new1")).expect("after clear");
}

#[test]
fn slow_fsync_does_not_block_other_operations() {
    let env = Env::new();
    let m = env.mount();
    let slow = env.p("slow.log");
    let other = env.p("other.log");
    durable_file(&slow, b"");
    durable_file(&other, b"");
    cmd(&m, "slow-fsync slow.log 2500");
    let mut h = OpenOptions::new().append(true).open(&slow).unwrap();
    h.write_all(b"stalled").unwrap();
    let started = Instant::now();
    let fsync = std::thread::spawn(move || {
        let res = h.sync_all();
        (res, started.elapsed())
    });
    wait_for("the fsync to stall", || m.status().fsyncs_stalled == 1);
    let t = Instant::now();
    let mut o = OpenOptions::new()
        .read(true)
        .append(true)
        .open(&other)
        .unwrap();
    o.write_all(b"meanwhile").unwrap();
    o.sync_all().unwrap();
    assert_eq!(fs::read(&other).unwrap(), b"meanwhile");
    fs::read_dir(&env.mnt).unwrap().for_each(drop);
    let other_took = t.elapsed();
    assert!(!fsync.is_finished(), "the slow fsync is still waiting");
    assert!(
        other_took < Duration::from_millis(1250),
        "other I/O took {other_took:?}"
    );
    let (res, took) = fsync.join().unwrap();
    res.expect("the slow fsync succeeds");
    assert!(took >= Duration::from_millis(2500), "fsync took {took:?}");
    drop(o);
    let _m = env.power_cycle(m);
    assert_eq!(fs::read(&slow).unwrap(), b"stalled");
    assert_eq!(fs::read(&other).unwrap(), b"meanwhile");
}

#[test]
fn power_loss_during_a_stalled_fsync_fails_it() {
    let env = Env::new();
    let m = env.mount();
    let f = env.p("f");
    durable_file(&f, b"");
    cmd(&m, "slow-fsync ** 800");
    let mut h = OpenOptions::new().append(true).open(&f).unwrap();
    h.write_all(b"never durable").unwrap();
    let fsync = std::thread::spawn(move || h.sync_all());
    wait_for("the fsync to stall", || m.status().fsyncs_stalled == 1);
    cmd(&m, "power-loss");
    assert_errno(fsync.join().unwrap(), libc::EIO, "stalled fsync");
    assert_eq!(m.status().fsyncs_failed, 1);
    m.shutdown().unwrap();
    let _m = env.mount();
    assert_eq!(fs::read(&f).unwrap(), b"");
}

#[test]
fn malformed_commands_are_refused_and_change_nothing() {
    let env = Env::new();
    let m = env.mount();
    let before = status(m.control_path()).unwrap();
    for line in [
        "",
        "reboot",
        "power-loss now",
        "tear",
        "tear seven",
        "fail-fsync **",
        "fail-fsync ** 0",
        "fail-fsync ** -1",
        "fail-fsync a[ 1",
        "enospc ** lots",
        "slow-fsync ** soon",
        "status extra",
        "clear everything",
    ] {
        match control(m.control_path(), line) {
            Err(FaultFsError::Refused(msg)) => assert!(!msg.is_empty(), "{line:?}"),
            other => panic!("{line:?}: expected a refusal, got {other:?}"),
        }
    }
    assert!(matches!(
        control(m.control_path(), "power-loss\nstatus"),
        Err(FaultFsError::Refused(_))
    ));
    // Raw protocol: one answer line per command line, on one connection.
    let mut s = std::os::unix::net::UnixStream::connect(m.control_path()).unwrap();
    s.write_all(b"bogus\nstatus\n").unwrap();
    let mut r = io::BufReader::new(s);
    let mut line = String::new();
    io::BufRead::read_line(&mut r, &mut line).unwrap();
    assert!(
        line.starts_with("error unknown command \"bogus\""),
        "{line}"
    );
    line.clear();
    io::BufRead::read_line(&mut r, &mut line).unwrap();
    assert!(line.starts_with("ok {"), "{line}");

    assert_eq!(status(m.control_path()).unwrap(), before);
    // No rule was installed and power is on.
    let f = env.p("f");
    durable_file(&f, b"fine");
    assert_eq!(fs::read(&f).unwrap(), b"fine");
}

#[test]
fn status_counts_writes_fsyncs_and_pending_changes() {
    let env = Env::new();
    let m = env.mount();
    assert_eq!(status(m.control_path()).unwrap(), Status::default());
    let mut h = File::create(env.p("f")).unwrap();
    h.write_all(b"one").unwrap();
    h.write_all(b"two").unwrap();
    let st = status(m.control_path()).unwrap();
    assert_eq!(
        (st.writes, st.unsynced_files, st.unsynced_dir_ops, st.fsyncs),
        (2, 1, 1, 0)
    );
    h.sync_all().unwrap();
    let st = m.status();
    assert_eq!(
        (st.fsyncs, st.unsynced_files, st.unsynced_dir_ops),
        (1, 0, 1)
    );
    fsync_dir(&env.mnt);
    let st = m.status();
    assert_eq!((st.fsyncs, st.unsynced_dir_ops), (2, 0));
    drop(h);
    cmd(&m, "power-loss");
    let st = status(m.control_path()).unwrap();
    assert!(st.power_lost);
    assert_eq!(st.undo_errors, 0);
    let raw = control(m.control_path(), "status").unwrap();
    for key in [
        "writes",
        "fsyncs",
        "fsyncs_failed",
        "fsyncs_stalled",
        "enospc",
        "unsynced_files",
        "unsynced_dir_ops",
        "power_lost",
        "undo_errors",
    ] {
        assert!(raw.contains(&format!("\"{key}\":")), "{key} in {raw}");
    }
}

#[test]
fn the_graveyard_is_hidden_and_cleaned_at_start() {
    let env = Env::new();
    let grave = env.backing.join(ferry_faultfs::GRAVEYARD);
    fs::create_dir(&grave).unwrap();
    fs::write(grave.join("removed-99"), b"left by a killed run").unwrap();
    let _m = env.mount();
    assert_eq!(env.graveyard_entries(), 0);
    assert_errno(fs::metadata(env.p(".faultfs")), libc::ENOENT, "lookup");
    assert_errno(fs::create_dir(env.p(".faultfs")), libc::EPERM, "mkdir");
    assert_eq!(fs::read_dir(&env.mnt).unwrap().count(), 0);
}

#[test]
fn shutdown_with_an_open_file_detaches_without_hanging() {
    let env = Env::new();
    let m = env.mount();
    let f = env.p("f");
    durable_file(&f, b"x");
    let h = File::open(&f).unwrap();
    let t = Instant::now();
    let res = m.shutdown();
    assert!(matches!(res, Err(FaultFsError::Busy { .. })), "{res:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
    drop(h);
    // Detached: the mountpoint is free again.
    let m = env.mount();
    assert_eq!(fs::read(&f).unwrap(), b"x");
    // A second mount on a live mountpoint, or on a live control socket, is refused.
    let res = Mount::start(&env.backing, &env.mnt, &env.p("../other.sock"));
    assert!(
        matches!(res, Err(FaultFsError::AlreadyMounted { .. })),
        "{res:?}"
    );
    let other = tempfile::tempdir().unwrap();
    let res = Mount::start(&env.backing, other.path(), m.control_path());
    assert!(matches!(res, Err(FaultFsError::Control { .. })), "{res:?}");
    assert_eq!(fs::read(&f).unwrap(), b"x");
}

#[test]
fn one_faultfs_per_backing_folder() {
    let env = Env::new();
    let m = env.mount();
    durable_file(&env.p("f"), b"f");
    let other = tempfile::tempdir().unwrap();
    let res = Mount::start(&env.backing, other.path(), &other.path().join("sock"));
    match res {
        Err(FaultFsError::Backing { source, .. }) => {
            assert!(source.to_string().contains("another faultfs"), "{source}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!other.path().join("sock").exists(), "no socket left behind");
    assert_eq!(fs::read(env.p("f")).unwrap(), b"f");
    m.shutdown().unwrap();
}

// ---- a faultfs server in another process ----

const HELPER_ENV: &str = "FERRY_FAULTFS_TEST_SERVER";

/// Not a test of its own: the body of the child process the lifecycle tests start (the
/// test binary run again with only this test and the paths in `HELPER_ENV`).
#[test]
fn server_process() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let paths: Vec<&str> = spec.split('\n').collect();
    ferry_faultfs::run_foreground(
        Path::new(paths[0]),
        Path::new(paths[1]),
        Path::new(paths[2]),
    )
    .expect("run_foreground");
}

fn spawn_server(env: &Env) -> Child {
    let spec = format!(
        "{}\n{}\n{}",
        env.backing.display(),
        env.mnt.display(),
        env.ctl.display()
    );
    let log = env.mnt.with_file_name("server.log");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "server_process",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(HELPER_ENV, spec)
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for("the server process to mount", || {
        if let Some(exit) = child.try_wait().unwrap() {
            panic!(
                "the faultfs server process exited ({exit}) before mounting \
                 (these tests need root and /dev/fuse):\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        status(&env.ctl).is_ok()
    });
    child
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server process did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_killed_server_leaves_enotconn_and_the_next_start_detaches_it() {
    let env = Env::new();
    let mut child = spawn_server(&env);
    durable_file(&env.p("synced"), b"synced");
    fs::write(env.p("unsynced"), b"not fsynced").unwrap();
    durable_file(&env.p("removed"), b"r");
    fs::remove_file(env.p("removed")).unwrap();
    child.kill().unwrap(); // SIGKILL
    wait_exit(&mut child);
    assert_errno(
        fs::metadata(env.p("synced")),
        libc::ENOTCONN,
        "stat on a dead mount",
    );
    assert_errno(
        fs::metadata(&env.mnt),
        libc::ENOTCONN,
        "stat of the mountpoint",
    );

    // No power loss happened: the backing folder is the durable state, the pending unlink
    // counts as done.
    let m = env.mount();
    assert_eq!(fs::read(env.p("synced")).unwrap(), b"synced");
    assert_eq!(fs::read(env.p("unsynced")).unwrap(), b"not fsynced");
    assert!(!env.p("removed").exists());
    assert_eq!(env.graveyard_entries(), 0);
    assert_eq!(m.status(), Status::default());
}

#[test]
fn sigterm_unmounts_the_foreground_server() {
    let env = Env::new();
    let mut child = spawn_server(&env);
    durable_file(&env.p("f"), b"f");
    let parent_dev = fs::metadata(env.mnt.parent().unwrap()).unwrap().dev();
    assert_ne!(fs::metadata(&env.mnt).unwrap().dev(), parent_dev);
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let st = wait_exit(&mut child);
    assert!(st.success(), "server exit: {st}");
    assert_eq!(
        fs::metadata(&env.mnt).unwrap().dev(),
        parent_dev,
        "unmounted"
    );
    assert!(!env.ctl.exists(), "control socket removed");
    assert_eq!(fs::read(env.backing.join("f")).unwrap(), b"f");
}
