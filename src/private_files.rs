//! Files only their owner may read: the database (and, through its mode, SQLite's `-wal`,
//! `-shm` and `-journal` files), backups and the generated callback credentials all hold
//! callback passwords. Created 0600, directories 0700; a file found readable by others is
//! reported, not changed (see [`warn_if_shared`]).

use std::path::Path;

/// Permission bits of a file of ours.
const PRIVATE_FILE: u32 = 0o600;
/// Permission bits of a directory we create.
const PRIVATE_DIRECTORY: u32 = 0o700;

/// Creates `directory` and any missing parents, each 0700. Existing ones are left as they are.
pub fn create_directory_all(directory: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(PRIVATE_DIRECTORY);
    }
    builder.create(directory)
}

/// Creates `path`, which must not exist, readable and writable by its owner only.
pub fn create_new(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(PRIVATE_FILE);
    }
    options.open(path)
}

/// The permission bits of `path` when its group or other users may use it.
pub fn shared_mode(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Logs a warning when `path` (`what` it is, for the message) can be read by others.
///
/// The file is not changed: it exists, so an operator made it (or restored it, or let an older
/// version create it) and may have given a group read access on purpose, for a backup or
/// monitoring account. Narrowing it behind their back would break that silently; a warning at
/// every start tells them what to do, and files this listener creates are private from the start.
pub fn warn_if_shared(path: &Path, what: &str) {
    if let Some(mode) = shared_mode(path) {
        tracing::warn!(
            path = %path.display(),
            mode = %format!("{mode:o}"),
            "the {what} is readable by other users than its owner; it holds callback passwords: \
             chmod 600 it (and its -wal and -shm files) unless that is intended"
        );
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn files_and_directories_are_created_for_the_owner_only() {
        let root = tempfile::tempdir().unwrap();
        let directory = root.path().join("a").join("b");
        create_directory_all(&directory).unwrap();
        let file = directory.join("secret");
        create_new(&file).unwrap();

        assert_eq!(mode(&root.path().join("a")), 0o700);
        assert_eq!(mode(&directory), 0o700);
        assert_eq!(mode(&file), 0o600);
        assert_eq!(shared_mode(&file), None);
        assert!(create_new(&file).is_err(), "an existing file is not reused");
    }

    #[test]
    fn a_file_readable_by_its_group_is_seen_as_shared() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("shared");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();

        assert_eq!(shared_mode(&file), Some(0o640));
    }
}
