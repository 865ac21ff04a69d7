//! Who may use which area of the server: `--access AREA=WHO`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The parts of the server access is granted to separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Area {
    /// `/v2/`: pulling images.
    Pull,
    /// `/dl/`: the download proxy.
    Download,
    /// `/metrics`.
    Metrics,
    /// `/admin/`.
    Admin,
}

impl Area {
    /// Every area.
    pub const ALL: [Self; 4] = [Self::Pull, Self::Download, Self::Metrics, Self::Admin];

    /// The name in `--access` and the config file.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Download => "download",
            Self::Metrics => "metrics",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Area {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Area {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|area| area.name() == text)
            .ok_or_else(|| format!("unknown area {text:?} (pull, download, metrics or admin)"))
    }
}

/// Who a grant names: `anonymous` (anyone, without credentials), `*` (anyone who
/// authenticated), or one user or token name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Who {
    /// Anyone, credentials or not.
    Anonymous,
    /// Any authenticated client.
    Authenticated,
    /// One user (htpasswd) or token name.
    Named(String),
}

impl std::str::FromStr for Who {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "" => Err("empty name".to_owned()),
            "anonymous" => Ok(Self::Anonymous),
            "*" => Ok(Self::Authenticated),
            name => Ok(Self::Named(name.to_owned())),
        }
    }
}

/// Grants per area. An area without grants falls back to the default: with client
/// authentication, `pull`, `download` and `metrics` are open to any authenticated client and
/// `admin` to nobody; without it, everything is anonymous except `admin`, which only loopback
/// clients reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    by_area: BTreeMap<Area, BTreeSet<Who>>,
}

impl Grants {
    /// Parse `AREA=WHO` (one grant; repeat to grant an area to several).
    ///
    /// ```
    /// use dunite::auth::{Area, Grants};
    ///
    /// let mut grants = Grants::default();
    /// grants.add("metrics=prometheus").unwrap();
    /// grants.add("pull=anonymous").unwrap();
    /// assert!(grants.is_anonymous(Area::Pull, true));
    /// assert!(!grants.is_anonymous(Area::Metrics, true));
    /// assert!(grants.add("push=alice").is_err(), "no such area");
    /// ```
    ///
    /// # Errors
    ///
    /// A message naming what is wrong.
    pub fn add(&mut self, spec: &str) -> Result<(), String> {
        let (area, who) = spec.split_once('=').ok_or_else(|| format!("{spec:?} is not AREA=WHO"))?;
        self.grant(area.trim().parse()?, who.trim().parse()?);
        Ok(())
    }

    /// Grant `area` to `who`.
    pub fn grant(&mut self, area: Area, who: Who) {
        self.by_area.entry(area).or_default().insert(who);
    }

    /// Replace the grants of every area `other` names with `other`'s (flags over the file).
    pub fn replace_with(&mut self, other: Self) {
        self.by_area.extend(other.by_area);
    }

    /// Whether any grant names `area`.
    #[must_use]
    pub fn names(&self, area: Area) -> bool {
        self.by_area.contains_key(&area)
    }

    /// The grants of `area`, with defaults for an area not named.
    #[must_use]
    pub(crate) fn resolve(&self, area: Area, client_auth: bool) -> Rule {
        if let Some(grants) = self.by_area.get(&area) {
            return Rule::Grants(grants.clone());
        }
        match (area, client_auth) {
            (Area::Admin, false) => Rule::LoopbackOnly,
            (Area::Admin, true) => Rule::Grants(BTreeSet::new()),
            (_, false) => Rule::Grants(BTreeSet::from([Who::Anonymous])),
            (_, true) => Rule::Grants(BTreeSet::from([Who::Authenticated])),
        }
    }

    /// Whether `area` is open to clients without credentials (by default or by a grant).
    #[must_use]
    pub fn is_anonymous(&self, area: Area, client_auth: bool) -> bool {
        match self.resolve(area, client_auth) {
            Rule::Grants(grants) => grants.contains(&Who::Anonymous),
            Rule::LoopbackOnly => false,
        }
    }
}

/// Who may use one area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rule {
    /// Those named.
    Grants(BTreeSet<Who>),
    /// Anyone connecting from a loopback address (the admin area without client auth).
    LoopbackOnly,
}

impl Rule {
    /// Whether a client, known as `name` (`None`: no credentials), connecting from a
    /// loopback address or not, may use the area.
    pub(crate) fn permits(&self, name: Option<&str>, loopback: bool) -> bool {
        match self {
            Self::LoopbackOnly => loopback,
            Self::Grants(grants) => grants.iter().any(|who| match (who, name) {
                (Who::Anonymous, _) => true,
                (Who::Authenticated, Some(_)) => true,
                (Who::Named(granted), Some(name)) => granted == name,
                (_, None) => false,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_whether_clients_authenticate() {
        let none = Grants::default();
        assert!(none.resolve(Area::Pull, false).permits(None, false));
        assert!(!none.resolve(Area::Admin, false).permits(None, false), "admin is loopback-only");
        assert!(none.resolve(Area::Admin, false).permits(None, true));
        assert!(!none.resolve(Area::Pull, true).permits(None, true));
        assert!(none.resolve(Area::Pull, true).permits(Some("alice"), false));
        assert!(!none.resolve(Area::Admin, true).permits(Some("alice"), true), "admin is granted by name");
    }

    #[test]
    fn grants_name_users_anyone_or_everyone() {
        let mut grants = Grants::default();
        for spec in ["metrics=prometheus", "metrics = alice", "pull=anonymous", "admin=*"] {
            grants.add(spec).unwrap();
        }
        let metrics = grants.resolve(Area::Metrics, true);
        assert!(metrics.permits(Some("prometheus"), false) && metrics.permits(Some("alice"), false));
        assert!(!metrics.permits(Some("bob"), false) && !metrics.permits(None, true));
        assert!(grants.resolve(Area::Pull, true).permits(None, false));
        assert!(grants.is_anonymous(Area::Pull, true) && !grants.is_anonymous(Area::Download, true));
        assert!(grants.resolve(Area::Admin, true).permits(Some("bob"), false));
        for bad in ["pull", "push=alice", "pull="] {
            assert!(grants.add(bad).is_err(), "{bad}");
        }
    }
}
