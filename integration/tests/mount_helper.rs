//! The mount helper as an operator uses it: names installed by the real
//! tools/install-names, then the real mount(8) and umount(8) over a loop device,
//! `mount -t fuse.mcfs`, `mount -t mcfs`, and the fstab line of
//! packaging/fstab.example through a real lock server.
//!
//! mount(8) looks for helpers only in /sbin, /sbin/fs.d and /sbin/fs. Each test
//! runs in a private mount namespace of its own thread whose /sbin has the
//! freshly installed helpers laid over it (ops::private_mount_namespace), so the
//! machine's /sbin is never written to and nothing mounted here is seen outside.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use mcfs_integration::ops::{self, mounted_type, private_mount_namespace, run, wait_pid_gone, PidFileGuard, Unmount};
use mcfs_integration::{bin, dlmd, fsck, secret_file, tempdir, workspace_root, LoopDev};

/// `tools/install-names DIR`: every dotted name, as symlinks into target/debug.
fn install_helpers(dir: &Path) -> PathBuf {
    bin("mcfs-node"); // built
    let o = run(Command::new(workspace_root().join("tools/install-names")).arg(dir)).unwrap();
    assert!(o.ok(), "tools/install-names {}: {}", dir.display(), o.text);
    for n in ["mkfs.mcfs", "fsck.mcfs", "mount.fuse.mcfs", "mount.mcfs"] {
        assert!(dir.join(n).exists(), "install-names did not install {n}:\n{}", o.text);
    }
    dir.to_path_buf()
}

/// Run mount(8)/umount(8) with its output in a file, not a pipe: the node
/// daemon the helper forks inherits the helper's stderr, so a pipe would stay
/// open (and a reader wait) as long as the filesystem is mounted.
fn logged(cmd: &mut Command, log: &Path) -> (i32, String) {
    let f = fs::File::create(log).unwrap();
    let st = cmd.stdin(Stdio::null()).stdout(Stdio::from(f.try_clone().unwrap())).stderr(Stdio::from(f)).status().unwrap();
    // the daemon may still be writing its first lines; what mount said is there
    (st.code().unwrap_or(-1), ops::strip_ansi(&fs::read_to_string(log).unwrap_or_default()))
}

/// Use the mount like a user: write, read back, list.
fn exercise(mnt: &Path, name: &str) {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(mnt.join(name), &data).unwrap();
    assert_eq!(fs::read(mnt.join(name)).unwrap(), data);
    assert!(fs::read_dir(mnt).unwrap().any(|e| e.unwrap().file_name() == name));
}

/// umount(8) DIR, then the node daemon (not our child: the helper forked it)
/// must exit and, having unmounted cleanly, remove its pid file.
fn umount_and_wait(mnt: &Path, daemon: &mut PidFileGuard, log: &Path) {
    let pid = daemon.pid().expect("the node daemon wrote its pid file");
    let (code, text) = logged(Command::new("umount").arg(mnt), log);
    assert_eq!(code, 0, "umount {}: {text}", mnt.display());
    assert!(mounted_type(mnt).is_none());
    wait_pid_gone(pid, Duration::from_secs(60)).unwrap();
    assert!(!daemon.pid_file.exists(), "a clean exit removes the pid file");
    daemon.pid = None;
}

#[test]
fn mount_t_fuse_mcfs_and_t_mcfs_mount_serve_and_unmount_cleanly() {
    let t = tempdir();
    let helpers = install_helpers(&t.path().join("sbin"));
    let ld = LoopDev::new_image(t.path(), 256 << 20).unwrap();
    ops::mkfs(&ld.path, &["-p", "nolock", "-J", "8"]).unwrap();
    private_mount_namespace(&helpers).unwrap();

    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let pid_file = t.path().join("node.pid");
    let _unmount = Unmount(mnt.clone());
    let mut daemon = PidFileGuard::new(&pid_file);
    let log = t.path().join("mount.log");

    // 1. mount -t fuse.mcfs: mount(8) runs /sbin/mount.fuse.mcfs DEV DIR -o ...
    let opts = format!("lock=nolock,node_id=1,pid_file={}", pid_file.display());
    let (code, text) = logged(Command::new("mount").args(["-t", "fuse.mcfs", "-o", &opts]).arg(&ld.path).arg(&mnt), &log);
    assert_eq!(code, 0, "mount -t fuse.mcfs: {text}");
    // the helper returns only once the mount is there
    let ty = mounted_type(&mnt).expect("mounted when mount(8) returns");
    assert!(ty.starts_with("fuse"), "a FUSE mount, not {ty}");
    let pid = daemon.pid().unwrap();
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("mount.fuse.mcfs"), "the daemon is the helper's child");
    exercise(&mnt, "via-fuse.mcfs");
    umount_and_wait(&mnt, &mut daemon, &log);

    // 2. mount -t mcfs finds /sbin/mount.mcfs, the same program; the data is still there
    let (code, text) = logged(Command::new("mount").args(["-t", "mcfs", "-o", &opts]).arg(&ld.path).arg(&mnt), &log);
    assert_eq!(code, 0, "mount -t mcfs: {text}");
    assert_eq!(fs::read(mnt.join("via-fuse.mcfs")).unwrap().len(), 300_000);
    exercise(&mnt, "via-mcfs");
    umount_and_wait(&mnt, &mut daemon, &log);

    let (code, out) = fsck(&ld.path);
    assert_eq!(code, 0, "fsck after two mount/umount cycles:\n{out}");
}

/// The first line of packaging/fstab.example, with its device, mount point,
/// lock server, secret and pid file pointed at this test's.
fn fstab_from_example(dev: &Path, mnt: &Path, dlm: &str, secret: &Path, pid_file: &Path) -> String {
    let example = fs::read_to_string(workspace_root().join("packaging/fstab.example")).unwrap();
    let line = example.lines().find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')).expect("an fstab line in the example");
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.len(), 6, "fstab has six fields: {line}");
    assert_eq!(f[2], "fuse.mcfs");
    assert_eq!((f[4], f[5]), ("0", "0"), "never dump, never fsck a shared device at boot");
    let opts: Vec<String> = f[3]
        .split(',')
        .map(|o| match o.split_once('=') {
            Some(("dlm", _)) => format!("dlm={dlm}"),
            Some(("secret_file", _)) => format!("secret_file={}", secret.display()),
            Some(("pid_file", _)) => format!("pid_file={}", pid_file.display()),
            _ => o.to_string(),
        })
        .collect();
    for want in ["_netdev", "nofail", "node_id=1"] {
        assert!(opts.iter().any(|o| o == want), "the example's options lack {want}: {line}");
    }
    format!("{} {} {} {} 0 0\n", dev.display(), mnt.display(), f[2], opts.join(","))
}

#[test]
fn fstab_example_line_mounts_through_the_lock_server() {
    let t = tempdir();
    let helpers = install_helpers(&t.path().join("sbin"));
    let secret = secret_file(t.path()).unwrap();
    let dlm = dlmd::start_dlm(t.path(), "dlm", &secret, None, &[]).unwrap();
    let ld = LoopDev::new_image(t.path(), 256 << 20).unwrap();
    ops::mkfs(&ld.path, &["-p", "dlm", "-t", "test:fstab", "-j", "2", "-J", "8"]).unwrap();
    private_mount_namespace(&helpers).unwrap();

    let mnt = t.path().join("data");
    fs::create_dir(&mnt).unwrap();
    let pid_file = t.path().join("node.pid");
    let fstab = t.path().join("fstab");
    fs::write(&fstab, fstab_from_example(&ld.path, &mnt, &dlm.addr, &secret, &pid_file)).unwrap();
    let _unmount = Unmount(mnt.clone());
    let mut daemon = PidFileGuard::new(&pid_file);
    let log = t.path().join("mount.log");

    // `mount DIR` with the line in fstab (-T: this fstab instead of /etc/fstab)
    let (code, text) = logged(Command::new("mount").arg("-T").arg(&fstab).arg(&mnt), &log);
    assert_eq!(code, 0, "mount by fstab line {}: {text}", fs::read_to_string(&fstab).unwrap());
    exercise(&mnt, "from-fstab");
    // it joined the lock server's lockspace as node 1, with a journal
    let o = run(ops::mcfs(&["status", "--json", "--dlm", &dlm.addr, "--secret-file"]).arg(&secret).args(["--cluster-dir", "/nonexistent"])).unwrap();
    assert!(o.ok(), "{}", o.text);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let ls = &v["lock_server"]["lockspaces"][0];
    assert_eq!(ls["name"], "test:fstab", "{v:#}");
    assert!(ls["members"].as_array().unwrap().iter().any(|m| m["node"] == 1 && m["state"] == "active"), "{v:#}");
    umount_and_wait(&mnt, &mut daemon, &log);

    let (code, out) = fsck(&ld.path);
    assert_eq!(code, 0, "fsck after the fstab mount:\n{out}");
}

#[test]
fn helper_failures_reach_the_mount_command() {
    let t = tempdir();
    let helpers = install_helpers(&t.path().join("sbin"));
    let ld = LoopDev::new_image(t.path(), 64 << 20).unwrap();
    private_mount_namespace(&helpers).unwrap();
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let _unmount = Unmount(mnt.clone());
    let pid_file = t.path().join("node.pid");
    let _daemon = PidFileGuard::new(&pid_file);
    let log = t.path().join("mount.log");
    let mount = |opts: &str| logged(Command::new("mount").args(["-t", "fuse.mcfs", "-o", opts]).arg(&ld.path).arg(&mnt), &log);

    // refused before anything starts
    let (code, text) = mount("lock=nolock,node_id=1,bogus_option");
    assert_ne!(code, 0);
    assert!(text.contains("unknown mount option 'bogus_option'"), "{text}");
    let (code, text) = mount("lock=nolock");
    assert_ne!(code, 0);
    assert!(text.contains("node-id") || text.contains("node_id"), "a missing node id is named: {text}");
    let (code, text) = mount("node_id=1");
    assert_ne!(code, 0);
    assert!(text.contains("--dlm") || text.contains("dlm="), "a cluster mount without a lock server is refused: {text}");
    // refused by the daemon the helper forked: mount(8) still gets the reason
    let (code, text) = mount(&format!("lock=nolock,node_id=1,pid_file={}", pid_file.display()));
    assert_ne!(code, 0);
    assert!(text.contains("not an mcfs filesystem"), "an unformatted device: {text}");
    assert!(text.contains("exited before mounting"), "{text}");
    assert!(mounted_type(&mnt).is_none());
}
