//! Who a container runs as, by Docker's rules: a user given as `NAME`,
//! `UID`, `NAME:GROUP`, `UID:GID` (or any mix) is looked up in the *image's*
//! `/etc/passwd` and `/etc/group`, never the device's. A name the image does
//! not have is an error; a numeric uid it does not have is fine (gid 0 then).
//! The user's supplementary groups are the groups listing it as a member
//! (only when no group was given), and HOME is its home directory.

/// A resolved container user.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// From the passwd entry; `/` when there is none (Docker's default).
    pub home: String,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter(|l| !l.starts_with('#')).filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4).then_some(())?;
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f.get(5).copied().unwrap_or(""),
        })
    })
}

/// (name, gid, members) of each /etc/group line.
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter(|l| !l.starts_with('#')).filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3).then_some(())?;
        let members = f.get(3).map_or_else(Vec::new, |m| m.split(',').filter(|s| !s.is_empty()).collect());
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolves `user` (Docker's `--user` syntax; empty = root) against the
/// image's passwd and group files (`None` when the image has none).
pub fn resolve(user: &str, passwd: Option<&str>, group: Option<&str>) -> Result<ResolvedUser, String> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let passwd = passwd.unwrap_or("");
    let group = group.unwrap_or("");
    let (uid, gid, name, home) = match user_part.parse::<u32>() {
        Ok(uid) => match passwd_entries(passwd).find(|e| e.uid == uid) {
            Some(e) => (uid, e.gid, Some(e.name), e.home),
            None => (uid, 0, None, "/"),
        },
        Err(_) => {
            let e = passwd_entries(passwd).find(|e| e.name == user_part).ok_or_else(|| {
                format!("unable to find user {user_part}: no matching entries in the image's /etc/passwd")
            })?;
            (e.uid, e.gid, Some(e.name), e.home)
        }
    };
    let (gid, additional_gids) = match group_part {
        Some(g) if !g.is_empty() => {
            let gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => group_entries(group).find(|(n, _, _)| *n == g).map(|(_, gid, _)| gid).ok_or_else(|| {
                    format!("unable to find group {g}: no matching entries in the image's /etc/group")
                })?,
            };
            (gid, Vec::new())
        }
        _ => {
            let mut extra: Vec<u32> = name
                .map(|n| group_entries(group).filter(|(_, _, m)| m.contains(&n)).map(|(_, g, _)| g).collect())
                .unwrap_or_default();
            extra.retain(|g| *g != gid);
            extra.dedup();
            (gid, extra)
        }
    };
    let home = if home.is_empty() { "/" } else { home };
    Ok(ResolvedUser { uid, gid, additional_gids, home: home.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n# a comment\napp:x:1000:1000:App:/home/app:/bin/sh\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\nbroken line\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nstaff:x:50:app,other\naudio:x:29:app\nwheel:x:10:\n";

    fn r(user: &str) -> Result<ResolvedUser, String> {
        resolve(user, Some(PASSWD), Some(GROUP))
    }

    #[test]
    fn names_and_numbers_resolve_as_docker_does() {
        assert_eq!(r("").unwrap(), ResolvedUser { uid: 0, gid: 0, additional_gids: vec![], home: "/root".into() });
        let app = r("app").unwrap();
        assert_eq!(
            (app.uid, app.gid, app.additional_gids.clone(), app.home.as_str()),
            (1000, 1000, vec![50, 29], "/home/app")
        );
        assert_eq!(r("1000").unwrap(), app, "a uid the image knows gets its entry");
        let g = r("app:staff").unwrap();
        assert_eq!((g.uid, g.gid, g.additional_gids.len()), (1000, 50, 0), "an explicit group replaces the list");
        assert_eq!((r("app:7").unwrap().gid, r("1000:1000").unwrap().gid), (7, 1000));
        // A uid the image does not know: allowed, gid 0, HOME=/.
        assert_eq!(r("4242").unwrap(), ResolvedUser { uid: 4242, gid: 0, additional_gids: vec![], home: "/".into() });
        assert_eq!(r(":wheel").unwrap().gid, 10);
    }

    #[test]
    fn what_the_image_lacks_is_named() {
        assert!(r("ghost").unwrap_err().contains("unable to find user ghost"));
        assert!(r("app:ghosts").unwrap_err().contains("unable to find group ghosts"));
        // An image without /etc/passwd (scratch, distroless static): numbers only.
        assert_eq!(resolve("1000:1000", None, None).unwrap().uid, 1000);
        assert!(resolve("app", None, None).is_err());
    }
}
