//! The `kmsctl` command line: clap definitions and the parsers for levels, purposes and
//! `--context k=v` pairs. Parsing only; nothing here talks to the network.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kms_client::proto::{Classification, KeyPurpose};

use super::exit;

#[derive(Debug, Parser)]
#[command(
    name = "kmsctl",
    version,
    about = "Command-line client of the key management service",
    after_help = exit::HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    /// Output format on stdout.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// Where the server is and which certificate to present. These flags go before the command
/// (`kmsctl --key me.key datakey generate --key payroll`): the command's own `--key` names a KMS
/// key.
#[derive(Debug, Args)]
pub struct ConnectionArgs {
    /// Server URL, `https://host:port`.
    #[arg(long, env = "KMS_ENDPOINT")]
    pub endpoint: Option<String>,
    /// PEM file of the CA that issued the server certificate.
    #[arg(long, env = "KMS_CA")]
    pub ca: Option<PathBuf>,
    /// PEM file of this client's certificate.
    #[arg(long, env = "KMS_CERT")]
    pub cert: Option<PathBuf>,
    /// PEM file of this client's private key.
    #[arg(long = "key", env = "KMS_KEY", value_name = "KEY_PEM")]
    pub client_key: Option<PathBuf>,
    /// Deadline in seconds for connecting and for each call.
    #[arg(long, env = "KMS_TIMEOUT", default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// One JSON document for scripts; bytes in standard base64.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage keys (security officers).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Generate and decrypt envelope data keys.
    #[command(subcommand, name = "datakey")]
    DataKey(DataKeyCommand),
    /// Encrypt a file inside the HSM; the output file holds the ciphertext blob.
    Encrypt(EncryptArgs),
    /// Decrypt a ciphertext blob inside the HSM.
    Decrypt(DecryptArgs),
    /// Re-wrap blobs under the primary version of their key (after a rotation) or under another
    /// key.
    #[command(
        name = "rewrap",
        long_about = "Re-wrap blobs under the primary version of their key (after a rotation) or \
                      under another key of the same or a higher level, inside the HSM.\n\n\
                      --in holds one blob per line in standard base64, as `datakey generate \
                      --output json` prints `wrapped_data_key` (for a file written by `encrypt \
                      --out`, use `base64 -w0 FILE`). --out receives one line per input line, in \
                      the same order: the re-wrapped blob in base64, or, for a blob that failed, \
                      the input line copied unchanged (the summary names those lines). Blank \
                      lines are copied through and not counted. --out is written whole or not \
                      at all (a temporary file renamed at the end), so it may be the same file \
                      as --in.\n\n\
                      Every blob must be bound to the --context given. A progress bar is shown \
                      on stderr when stderr is a terminal; the summary goes to stdout."
    )]
    Rewrap(RewrapArgs),
    /// Two-officer approval requests: list, approve, reject (security officers).
    #[command(subcommand)]
    Approval(ApprovalCommand),
    /// The audit trail: read it (auditors), fetch its public key, verify it offline.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Registered calling systems: register, update, list, revoke (security officers).
    #[command(subcommand)]
    Caller(CallerCommand),
    /// The HSM token: its health (officers and auditors); objects of this service that no key in
    /// the store names: list, adopt, destroy (security officers).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Recipient key pairs of an exchange service, for sealed data keys (local; no connection).
    #[command(subcommand, name = "recipient-key")]
    RecipientKey(LocalRecipientKeyCommand),
}

/// The `token` commands (see `cli::token`).
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// List the objects that carry this service's marks but that no key version names (kept by
    /// start-up, never used), with what their labels say and whether they can be adopted.
    List,
    /// Adopt objects back into the key store from their labels (checked by the HSM): a version
    /// joins its key, a key the store lacks is made anew, and their blobs decrypt again.
    Adopt {
        /// Hex CKA_IDs of the objects (`token list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        object_ids: Vec<String>,
        /// Every adoptable object.
        #[arg(long)]
        all: bool,
    },
    /// File the destruction of an unknown object for a second officer (`approval approve`).
    Destroy {
        /// Hex CKA_ID of the object.
        object_id: String,
    },
    /// How the server's HSM is doing: whether it answers, reconnects, the last error, the jobs on
    /// each session pool (officers and auditors). Exits 6 while the HSM is lost.
    Health,
}

/// `kmsctl recipient-key` (local).
#[derive(Debug, Subcommand)]
pub enum LocalRecipientKeyCommand {
    /// Make a P-256 key pair: the private key (PKCS#8 PEM, mode 0600) opens the data keys sealed
    /// to it; an officer registers the public key (`caller recipient-key add`).
    Generate {
        /// The private key file (created; never overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The public key file (SubjectPublicKeyInfo PEM).
        #[arg(long = "public-out", value_name = "FILE")]
        public_out: PathBuf,
    },
}

/// `kmsctl caller recipient-key` (officers).
#[derive(Debug, Subcommand)]
pub enum RecipientKeyCommand {
    /// Register a recipient public key for a caller.
    Add {
        identity: String,
        /// SubjectPublicKeyInfo PEM file (`kmsctl recipient-key generate --public-out`).
        #[arg(long = "public-key", value_name = "PEM")]
        public_key: PathBuf,
    },
    /// Register a new recipient key and remove an old one.
    Rotate {
        identity: String,
        #[arg(long = "public-key", value_name = "PEM")]
        public_key: PathBuf,
        /// Fingerprint of the key to remove.
        #[arg(long, value_name = "FINGERPRINT")]
        remove: String,
    },
    /// Remove a recipient key.
    Remove {
        identity: String,
        fingerprint: String,
    },
}

/// The `caller` commands (see `cli::callers`).
#[derive(Debug, Subcommand)]
pub enum CallerCommand {
    /// Register a calling system, known by the URI SAN of its client certificate.
    Register(CallerRegisterArgs),
    /// Change a registered caller: only the fields given change.
    #[command(
        long_about = "Change a registered caller: only the fields given change; the others keep \
                      their registered values. --role and --allow-key, given at least once, \
                      replace the whole list; --no-allowed-keys empties the allowed keys, after \
                      which the caller may use no key."
    )]
    Update(CallerUpdateArgs),
    /// List the active callers.
    List {
        /// Also list revoked callers.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a caller: from now on every request it makes is refused.
    Revoke {
        /// The caller's identity (its certificate's URI SAN).
        identity: String,
    },
    /// A caller's recipient keys (the keys its sealed data keys may be sealed to).
    #[command(subcommand, name = "recipient-key")]
    RecipientKey(RecipientKeyCommand),
}

#[derive(Debug, Args)]
pub struct CallerRegisterArgs {
    /// The client certificate's URI subject alternative name, e.g. urn:kms:caller:tax-gateway.
    #[arg(long, value_name = "URI", value_parser = parse_non_empty)]
    pub identity: String,
    /// The agency that operates the system.
    #[arg(long, value_name = "TEXT")]
    pub agency: String,
    /// The system's name.
    #[arg(long, value_name = "TEXT")]
    pub name: String,
    /// Approved information-system security level, 1-5.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=5))]
    pub system_level: u32,
    /// The highest classification level it may use (UNCLASSIFIED ... TOP_SECRET;
    /// case-insensitive, '-' or '_').
    #[arg(long, value_name = "LEVEL", value_parser = parse_level)]
    pub clearance: Classification,
    /// A role: exchange, officer or auditor; repeat for more (at least one). The server checks
    /// the names.
    #[arg(long = "role", value_name = "ROLE", required = true, value_parser = parse_non_empty)]
    pub roles: Vec<String>,
    /// A key it may use: an exact name, a prefix ending in '*' ("tax/*"), or "*" for every key;
    /// repeat for more. Without any --allow-key the caller may use no key.
    #[arg(long = "allow-key", value_name = "PATTERN", value_parser = parse_non_empty)]
    pub allowed_keys: Vec<String>,
}

/// `caller update`: the identity and the changes; a field not given keeps its registered value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
#[command(group(
    clap::ArgGroup::new("change")
        .required(true)
        .multiple(true)
        .args([
            "agency",
            "name",
            "system_level",
            "clearance",
            "roles",
            "allowed_keys",
            "no_allowed_keys",
        ])
))]
pub struct CallerUpdateArgs {
    /// The caller's identity (its certificate's URI SAN).
    pub identity: String,
    /// New agency.
    #[arg(long, value_name = "TEXT")]
    pub agency: Option<String>,
    /// New system name.
    #[arg(long, value_name = "TEXT")]
    pub name: Option<String>,
    /// New system level, 1-5.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=5))]
    pub system_level: Option<u32>,
    /// New clearance level (UNCLASSIFIED ... TOP_SECRET).
    #[arg(long, value_name = "LEVEL", value_parser = parse_level)]
    pub clearance: Option<Classification>,
    /// A role (exchange, officer, auditor); repeat for more. Replaces all the roles.
    #[arg(long = "role", value_name = "ROLE", value_parser = parse_non_empty)]
    pub roles: Vec<String>,
    /// A key it may use (exact name, prefix ending in '*', or "*"); repeat for more. Replaces all
    /// the allowed keys.
    #[arg(
        long = "allow-key",
        value_name = "PATTERN",
        value_parser = parse_non_empty,
        conflicts_with = "no_allowed_keys"
    )]
    pub allowed_keys: Vec<String>,
    /// Remove every allowed key: the caller may then use no key.
    #[arg(long)]
    pub no_allowed_keys: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The newest records (role auditor).
    Tail {
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        lines: u32,
    },
    /// Write the trail (records, then signed checkpoints) as JSON lines, for a SIEM or for
    /// `audit verify --file` (role auditor).
    Export {
        /// Output file ('-' for stdout); written whole or not at all.
        #[arg(long, default_value = "-", value_name = "FILE")]
        out: PathBuf,
        /// First record to export.
        #[arg(long, default_value_t = 1, value_name = "SEQ")]
        from: u64,
    },
    /// Print where the trail stood at its newest commit, as the server keeps it outside the audit
    /// file (`SEQ:HASH`, for `verify --anchor`) (role auditor).
    Anchor,
    /// Print the PEM public key that verifies the checkpoints (any registered caller).
    PublicKey {
        /// Write it to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Verify the hash chain and every checkpoint signature offline, with the public key alone.
    /// Needs no connection. Exits 8 and names the first bad record if anything was edited,
    /// deleted, inserted or reordered.
    Verify {
        /// A copy of the server's audit database (`<store>.audit.db`). Repeat it to verify the
        /// trails of several servers sharing one store (one file per server), each against the
        /// `--anchor` given in the same position.
        #[arg(long, value_name = "FILE", required_unless_present = "file", conflicts_with = "file")]
        db: Vec<PathBuf>,
        /// An export made with `kmsctl audit export`.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// The PEM public key (`kmsctl audit public-key`).
        #[arg(long = "public-key", value_name = "PEM")]
        public_key: PathBuf,
        /// `SEQ:HASH` from `kmsctl audit anchor`: the trail must reach record SEQ with this hash
        /// (records cut after the last checkpoint are found this way). With several `--db`, one
        /// per file, in the same order (each server's own, from `kmsctl audit anchor` on it).
        #[arg(long, value_name = "SEQ:HASH")]
        anchor: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key.
    Create {
        /// Key name: 1-64 of letters, digits, '-', '_', '.', '/', starting with a letter or digit.
        #[arg(long)]
        name: String,
        /// Classification level (UNCLASSIFIED ... TOP_SECRET; case-insensitive, '-' or '_').
        #[arg(long, value_parser = parse_level)]
        level: Classification,
        /// envelope or hsm-encrypt; by default the server picks by level.
        #[arg(long, value_parser = parse_purpose)]
        purpose: Option<KeyPurpose>,
        /// Rotation period in days; by default the level's.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        rotation_days: Option<u32>,
    },
    /// List keys.
    List {
        /// Only keys of this level.
        #[arg(long, value_parser = parse_level)]
        level: Option<Classification>,
        /// Only keys whose name starts with this prefix.
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Show one key and its versions.
    Get {
        /// Key name.
        name: String,
    },
    #[command(flatten)]
    Lifecycle(KeyLifecycleCommand),
}

/// The `key` commands that change an existing key (see `cli::lifecycle`).
#[derive(Debug, Subcommand)]
pub enum KeyLifecycleCommand {
    /// Make a new primary version now; earlier versions keep decrypting. TOP_SECRET keys need a
    /// second officer.
    Rotate {
        /// Key name.
        name: String,
    },
    /// Set how often the key is rotated automatically.
    Schedule {
        /// Key name.
        name: String,
        /// Rotation period in days (1-3650), or 0 for the level's default.
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=3650))]
        days: u32,
    },
    /// Enable a disabled key.
    Enable {
        /// Key name.
        name: String,
    },
    /// Disable a key: it does no cryptography until enabled again. SENSITIVE_PERSONAL and above
    /// need a second officer.
    Disable {
        /// Key name.
        name: String,
    },
    /// Schedule the destruction of a key after the server's waiting period. SENSITIVE_PERSONAL and
    /// above need a second officer.
    #[command(
        long_about = "Schedule the destruction of a key after the server's waiting period, and \
                      print when it will happen. Until then the key does no cryptography and \
                      `key cancel-destroy` takes it back to DISABLED; afterwards its HSM objects \
                      are gone and nothing made with it can ever be decrypted again. \
                      SENSITIVE_PERSONAL and above need a second officer."
    )]
    Destroy {
        /// Key name.
        name: String,
    },
    /// Cancel a scheduled destruction; the key becomes DISABLED.
    CancelDestroy {
        /// Key name.
        name: String,
    },
    /// List and change the versions of a key.
    #[command(subcommand)]
    Version(VersionCommand),
}

#[derive(Debug, Subcommand)]
pub enum VersionCommand {
    /// List the versions of a key; the primary one is marked.
    List {
        /// Key name.
        name: String,
    },
    /// Enable a disabled version.
    Enable {
        /// Key name.
        name: String,
        /// Version number.
        #[arg(value_parser = parse_version)]
        version: NonZeroU32,
    },
    /// Disable a version (not the primary one): blobs made with it do not decrypt until it is
    /// enabled again. SENSITIVE_PERSONAL and above need a second officer.
    Disable {
        /// Key name.
        name: String,
        /// Version number.
        #[arg(value_parser = parse_version)]
        version: NonZeroU32,
    },
    /// Schedule the destruction of a version (not the primary one). SENSITIVE_PERSONAL and above
    /// need a second officer.
    Destroy {
        /// Key name.
        name: String,
        /// Version number.
        #[arg(value_parser = parse_version)]
        version: NonZeroU32,
    },
    /// Cancel the scheduled destruction of a version; it becomes DISABLED.
    CancelDestroy {
        /// Key name.
        name: String,
        /// Version number.
        #[arg(value_parser = parse_version)]
        version: NonZeroU32,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApprovalCommand {
    /// List pending approval requests.
    List {
        /// Also list approved, rejected and expired requests.
        #[arg(long)]
        all: bool,
    },
    /// Approve another officer's request; the change is made now.
    Approve {
        /// Request id (hex), as printed when the change was asked for.
        id: String,
    },
    /// Reject another officer's request; nothing changes.
    Reject {
        /// Request id (hex).
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct RewrapArgs {
    /// File of blobs, one per line in standard base64 ('-' for stdin).
    #[arg(long = "in", value_name = "FILE")]
    pub in_file: PathBuf,
    /// File to write the re-wrapped blobs to, one per line in the same order (not '-': stdout
    /// carries the summary).
    #[arg(long = "out", value_name = "FILE", value_parser = parse_output_file)]
    pub out_file: PathBuf,
    /// Re-wrap under this key (same level or higher); by default each blob's own key.
    #[arg(long = "key", value_name = "DEST")]
    pub destination_key: Option<String>,
    #[command(flatten)]
    pub context: ContextArgs,
    /// Blobs per ReWrapBatch call (1-1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub batch_size: u16,
}

#[derive(Debug, Subcommand)]
pub enum DataKeyCommand {
    /// Generate a data key under an envelope key.
    Generate {
        /// Envelope key name.
        #[arg(long)]
        key: String,
        #[command(flatten)]
        context: ContextArgs,
        /// Ask for the wrapped blob only; no data key is printed.
        #[arg(long, conflicts_with = "recipient_key")]
        no_plaintext: bool,
        /// Have the data key sealed to this recipient key (PKCS#8 PEM private key, whose public
        /// half an officer registered for the caller) and open it here, so that the plaintext
        /// never crosses the network (required for SENSITIVE_PERSONAL).
        #[arg(long = "recipient-key", value_name = "PEM")]
        recipient_key: Option<PathBuf>,
    },
    /// Turn a wrapped blob back into its data key.
    Decrypt {
        /// The wrapped blob in base64.
        #[arg(long, required_unless_present = "input", conflicts_with = "input")]
        wrapped: Option<String>,
        /// File holding the raw wrapped blob ('-' for stdin).
        #[arg(long = "in", value_name = "FILE")]
        input: Option<PathBuf>,
        #[command(flatten)]
        context: ContextArgs,
        /// The blob must belong to this key.
        #[arg(long)]
        key: Option<String>,
        /// Have the data key sealed to this registered recipient key and open it here.
        #[arg(long = "recipient-key", value_name = "PEM")]
        recipient_key: Option<PathBuf>,
    },
    /// Open a sealed data key (`recipient_sealed_data_key`) with a recipient private key from a
    /// file; no connection.
    Open {
        /// The sealed key in base64.
        #[arg(long)]
        sealed: String,
        /// The answer's `key_id` (hex) and `key_version`: the sealing is bound to them.
        #[arg(long = "key-id")]
        key_id: String,
        #[arg(long = "key-version")]
        key_version: u32,
        #[command(flatten)]
        context: ContextArgs,
        /// PKCS#8 PEM private key.
        #[arg(long = "recipient-key", value_name = "PEM")]
        recipient_key: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// Key name (an HSM_ENCRYPT key).
    #[arg(long)]
    pub key: String,
    /// Plaintext file ('-' for stdin).
    #[arg(long = "in", value_name = "FILE")]
    pub in_file: PathBuf,
    /// Ciphertext file to write ('-' for stdout).
    #[arg(long = "out", value_name = "FILE")]
    pub out_file: PathBuf,
    #[command(flatten)]
    pub context: ContextArgs,
}

#[derive(Debug, Args)]
pub struct DecryptArgs {
    /// Ciphertext file ('-' for stdin).
    #[arg(long = "in", value_name = "FILE")]
    pub in_file: PathBuf,
    /// Plaintext file to write ('-' for stdout); created with mode 0600.
    #[arg(long = "out", value_name = "FILE")]
    pub out_file: PathBuf,
    #[command(flatten)]
    pub context: ContextArgs,
    /// The ciphertext must belong to this key.
    #[arg(long)]
    pub key: Option<String>,
}

#[derive(Debug, Args)]
pub struct ContextArgs {
    /// Encryption context entry `k=v`; repeat for more. The same entries are needed to decrypt.
    #[arg(long = "context", value_name = "K=V", value_parser = parse_context_entry)]
    pub entries: Vec<(String, String)>,
}

impl ContextArgs {
    /// The entries as a map; a key given twice is an error (which value was meant?).
    pub fn to_map(&self) -> Result<BTreeMap<String, String>, DuplicateContextKey> {
        let mut map = BTreeMap::new();
        for (k, v) in &self.entries {
            if map.insert(k.clone(), v.clone()).is_some() {
                return Err(DuplicateContextKey(k.clone()));
            }
        }
        Ok(map)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--context key {0:?} is given more than once")]
pub struct DuplicateContextKey(pub String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextEntryError {
    #[error("expected k=v, got {0:?} (no '=')")]
    MissingEquals(String),
    #[error("the key of {0:?} is empty")]
    EmptyKey(String),
}

/// `k=v`, split at the first '=' (so values may contain '='). Values may be empty; keys may not.
pub fn parse_context_entry(text: &str) -> Result<(String, String), ContextEntryError> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| ContextEntryError::MissingEquals(text.to_owned()))?;
    if k.is_empty() {
        return Err(ContextEntryError::EmptyKey(text.to_owned()));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// A key version: 1 or more (0 would mean "the whole key" on the wire).
fn parse_version(text: &str) -> Result<NonZeroU32, String> {
    text.parse::<NonZeroU32>()
        .map_err(|_| format!("{text:?} is not a version number (1 or more)"))
}

/// A file path that is not '-'.
fn parse_output_file(text: &str) -> Result<PathBuf, &'static str> {
    if text == "-" {
        return Err("must be a file: stdout carries the summary");
    }
    Ok(PathBuf::from(text))
}

/// Any text but the empty (or all-blank) string.
fn parse_non_empty(text: &str) -> Result<String, &'static str> {
    if text.trim().is_empty() {
        return Err("must not be empty");
    }
    Ok(text.to_owned())
}

fn parse_level(text: &str) -> Result<Classification, kms_client::UnknownName> {
    kms_client::parse_classification(text)
}

fn parse_purpose(text: &str) -> Result<KeyPurpose, kms_client::UnknownName> {
    kms_client::parse_purpose(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kmsctl").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn context_entries_split_at_the_first_equals() {
        assert_eq!(parse_context_entry("a=b"), Ok(("a".into(), "b".into())));
        assert_eq!(parse_context_entry("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_context_entry("a="), Ok(("a".into(), String::new())));
        assert_eq!(
            parse_context_entry("ab"),
            Err(ContextEntryError::MissingEquals("ab".into()))
        );
        assert_eq!(
            parse_context_entry("=b"),
            Err(ContextEntryError::EmptyKey("=b".into()))
        );
    }

    #[test]
    fn duplicate_context_key_is_refused() {
        let cli = parse(&[
            "datakey",
            "generate",
            "--key",
            "k",
            "--context",
            "a=1",
            "--context",
            "a=2",
        ])
        .unwrap();
        let Command::DataKey(DataKeyCommand::Generate { context, .. }) = cli.command else {
            panic!()
        };
        assert_eq!(context.to_map(), Err(DuplicateContextKey("a".into())));
    }

    #[test]
    fn context_without_equals_is_a_usage_error() {
        let err = parse(&["datakey", "generate", "--key", "k", "--context", "oops"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn key_create_parses_level_purpose_and_rotation() {
        let cli = parse(&[
            "key",
            "create",
            "--name",
            "tax/2025",
            "--level",
            "sensitive-personal",
            "--purpose",
            "hsm-encrypt",
            "--rotation-days",
            "30",
        ])
        .unwrap();
        match cli.command {
            Command::Key(KeyCommand::Create {
                name,
                level,
                purpose,
                rotation_days,
            }) => {
                assert_eq!(name, "tax/2025");
                assert_eq!(level, Classification::SensitivePersonal);
                assert_eq!(purpose, Some(KeyPurpose::HsmEncrypt));
                assert_eq!(rotation_days, Some(30));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(cli.output, OutputFormat::Table);
    }

    #[test]
    fn unknown_level_is_a_usage_error_listing_the_levels() {
        let err = parse(&["key", "list", "--level", "ultra"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("TOP_SECRET"), "{err}");
    }

    #[test]
    fn connection_key_and_kms_key_are_distinct_flags() {
        let cli = parse(&[
            "--endpoint",
            "https://kms:7443",
            "--key",
            "me.key",
            "--output",
            "json",
            "datakey",
            "generate",
            "--key",
            "payroll",
            "--recipient-key",
            "r.pem",
        ])
        .unwrap();
        assert_eq!(cli.connection.client_key, Some(PathBuf::from("me.key")));
        assert_eq!(cli.output, OutputFormat::Json);
        let Command::DataKey(DataKeyCommand::Generate {
            key,
            recipient_key,
            no_plaintext,
            ..
        }) = cli.command
        else {
            panic!()
        };
        assert_eq!(
            (key.as_str(), recipient_key, no_plaintext),
            ("payroll", Some(PathBuf::from("r.pem")), false)
        );
    }

    #[test]
    fn output_flag_is_accepted_after_the_command() {
        let cli = parse(&["key", "get", "payroll", "--output", "json"]).unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
    }

    #[test]
    fn no_plaintext_conflicts_with_recipient() {
        assert!(parse(&[
            "datakey",
            "generate",
            "--key",
            "k",
            "--no-plaintext",
            "--recipient-key",
            "r.pem"
        ])
        .is_err());
    }

    #[test]
    fn datakey_decrypt_needs_exactly_one_source() {
        assert!(parse(&["datakey", "decrypt"]).is_err());
        assert!(parse(&["datakey", "decrypt", "--wrapped", "AAAA", "--in", "f"]).is_err());
        assert!(parse(&["datakey", "decrypt", "--in", "-"]).is_ok());
        assert!(parse(&[
            "datakey",
            "decrypt",
            "--wrapped",
            "AAAA",
            "--key",
            "k",
            "--recipient-key",
            "r.pem"
        ])
        .is_ok());
    }

    #[test]
    fn encrypt_and_decrypt_take_files() {
        let cli = parse(&[
            "encrypt",
            "--key",
            "secret-1",
            "--in",
            "-",
            "--out",
            "c.bin",
            "--context",
            "case=7",
        ])
        .unwrap();
        let Command::Encrypt(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.in_file, PathBuf::from("-"));
        assert_eq!(
            args.context
                .to_map()
                .unwrap()
                .get("case")
                .map(String::as_str),
            Some("7")
        );
        assert!(
            parse(&["decrypt", "--in", "c.bin"]).is_err(),
            "--out is required"
        );
    }

    #[test]
    fn lifecycle_commands_take_a_name_and_versions_take_a_number_of_1_or_more() {
        let cli = parse(&["key", "schedule", "tax", "--days", "0"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Key(KeyCommand::Lifecycle(KeyLifecycleCommand::Schedule {
                days: 0,
                ..
            }))
        ));
        assert!(
            parse(&["key", "schedule", "tax"]).is_err(),
            "--days is required"
        );
        assert!(parse(&["key", "schedule", "tax", "--days", "3651"]).is_err());
        let cli = parse(&["key", "version", "cancel-destroy", "tax", "2"]).unwrap();
        let Command::Key(KeyCommand::Lifecycle(KeyLifecycleCommand::Version(
            VersionCommand::CancelDestroy { name, version },
        ))) = cli.command
        else {
            panic!()
        };
        assert_eq!((name.as_str(), version.get()), ("tax", 2));
        for bad in ["0", "-1", "two"] {
            let err = parse(&["key", "version", "destroy", "tax", bad]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
        }
        for command in ["rotate", "enable", "disable", "destroy", "cancel-destroy"] {
            assert!(parse(&["key", command, "tax"]).is_ok(), "{command}");
        }
        let cli = parse(&["approval", "list", "--all", "--output", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Approval(ApprovalCommand::List { all: true })
        ));
        assert!(
            parse(&["approval", "approve"]).is_err(),
            "the id is required"
        );
    }

    #[test]
    fn rewrap_takes_files_a_destination_a_context_and_a_batch_size() {
        let cli = parse(&[
            "rewrap",
            "--in",
            "-",
            "--out",
            "new.txt",
            "--key",
            "archive",
            "--context",
            "case=7",
        ])
        .unwrap();
        let Command::Rewrap(args) = cli.command else {
            panic!()
        };
        assert_eq!(
            (
                args.in_file,
                args.out_file,
                args.destination_key,
                args.batch_size
            ),
            (
                PathBuf::from("-"),
                PathBuf::from("new.txt"),
                Some("archive".to_owned()),
                100
            )
        );
        assert!(parse(&["rewrap", "--in", "a", "--out", "-"]).is_err());
        assert!(parse(&["rewrap", "--in", "a", "--out", "b", "--batch-size", "1001"]).is_err());
        assert!(parse(&["rewrap", "--in", "a", "--out", "b", "--batch-size", "0"]).is_err());
        assert!(parse(&["rewrap", "--in", "a", "--out", "b", "--batch-size", "1000"]).is_ok());
    }

    const REGISTER: [&str; 12] = [
        "caller",
        "register",
        "--identity",
        "urn:kms:caller:tax-gateway",
        "--agency",
        "Tax Department",
        "--name",
        "Tax gateway",
        "--system-level",
        "3",
        "--clearance",
        "sensitive-personal",
    ];

    fn register_with(extra: &[&str]) -> Result<Cli, clap::Error> {
        let args: Vec<&str> = REGISTER.iter().chain(extra).copied().collect();
        parse(&args)
    }

    #[test]
    fn caller_register_takes_repeated_roles_and_allowed_keys() {
        let cli = register_with(&[
            "--role",
            "exchange",
            "--role",
            "officer",
            "--allow-key",
            "tax/*",
            "--allow-key",
            "citizens",
        ])
        .unwrap();
        let Command::Caller(CallerCommand::Register(args)) = cli.command else {
            panic!()
        };
        assert_eq!(args.identity, "urn:kms:caller:tax-gateway");
        assert_eq!(args.agency, "Tax Department");
        assert_eq!(args.name, "Tax gateway");
        assert_eq!(args.system_level, 3);
        assert_eq!(args.clearance, Classification::SensitivePersonal);
        assert_eq!(args.roles, ["exchange", "officer"]);
        assert_eq!(args.allowed_keys, ["tax/*", "citizens"]);
    }

    #[test]
    fn caller_register_needs_a_role_but_no_allowed_key() {
        let err = register_with(&[]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--role"), "{err}");
        let cli = register_with(&["--role", "auditor"]).unwrap();
        let Command::Caller(CallerCommand::Register(args)) = cli.command else {
            panic!()
        };
        assert!(args.allowed_keys.is_empty());
        for empty in [["--role", ""], ["--allow-key", " "]] {
            let args: Vec<&str> = ["--role", "auditor"]
                .iter()
                .chain(&empty)
                .copied()
                .collect();
            assert!(register_with(&args).is_err(), "{empty:?}");
        }
        let help = Cli::command()
            .find_subcommand_mut("caller")
            .and_then(|c| c.find_subcommand_mut("register"))
            .map(|c| c.render_long_help().to_string())
            .unwrap();
        assert!(
            help.contains("Without any --allow-key the caller may use no key"),
            "{help}"
        );
    }

    #[test]
    fn caller_system_level_is_1_to_5_and_roles_are_left_to_the_server() {
        for bad in ["0", "6", "-1", "three"] {
            let mut args = REGISTER;
            args[9] = bad;
            let args: Vec<&str> = args
                .iter()
                .chain(&["--role", "exchange"])
                .copied()
                .collect();
            assert_eq!(parse(&args).unwrap_err().exit_code(), 2, "{bad}");
        }
        for good in ["1", "5"] {
            let mut args = REGISTER;
            args[9] = good;
            let args: Vec<&str> = args
                .iter()
                .chain(&["--role", "exchange"])
                .copied()
                .collect();
            assert!(parse(&args).is_ok(), "{good}");
        }
        assert!(parse(&["caller", "update", "urn:x", "--system-level", "6"]).is_err());
        assert!(register_with(&["--clearance", "ultra", "--role", "exchange"]).is_err());
        // Any non-empty role is sent; the server refuses the ones it does not know.
        let cli = register_with(&["--role", "janitor"]).unwrap();
        let Command::Caller(CallerCommand::Register(args)) = cli.command else {
            panic!()
        };
        assert_eq!(args.roles, ["janitor"]);
    }

    #[test]
    fn caller_update_takes_only_the_changes_and_at_least_one() {
        let cli = parse(&[
            "caller",
            "update",
            "urn:kms:caller:tax-gateway",
            "--clearance",
            "secret",
            "--role",
            "officer",
            "--role",
            "auditor",
        ])
        .unwrap();
        let Command::Caller(CallerCommand::Update(args)) = cli.command else {
            panic!()
        };
        assert_eq!(
            args,
            CallerUpdateArgs {
                identity: "urn:kms:caller:tax-gateway".into(),
                clearance: Some(Classification::Secret),
                roles: vec!["officer".into(), "auditor".into()],
                ..Default::default()
            }
        );
        let cli = parse(&[
            "caller",
            "update",
            "urn:x",
            "--agency",
            "A",
            "--name",
            "N",
            "--system-level",
            "5",
            "--allow-key",
            "*",
            "--allow-key",
            "tax/*",
        ])
        .unwrap();
        let Command::Caller(CallerCommand::Update(args)) = cli.command else {
            panic!()
        };
        assert_eq!(
            (
                args.agency.as_deref(),
                args.name.as_deref(),
                args.system_level,
                args.allowed_keys.as_slice(),
                args.no_allowed_keys
            ),
            (
                Some("A"),
                Some("N"),
                Some(5),
                ["*".to_owned(), "tax/*".to_owned()].as_slice(),
                false
            )
        );
        let cli = parse(&["caller", "update", "urn:x", "--no-allowed-keys"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Caller(CallerCommand::Update(CallerUpdateArgs {
                no_allowed_keys: true,
                ..
            }))
        ));
        assert!(
            parse(&["caller", "update", "urn:x"]).is_err(),
            "nothing to change"
        );
        assert!(
            parse(&["caller", "update", "--name", "N"]).is_err(),
            "no identity"
        );
        assert!(parse(&[
            "caller",
            "update",
            "urn:x",
            "--allow-key",
            "*",
            "--no-allowed-keys"
        ])
        .is_err());
    }

    #[test]
    fn caller_list_and_revoke_parse() {
        let cli = parse(&["caller", "list"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Caller(CallerCommand::List { all: false })
        ));
        let cli = parse(&["caller", "list", "--all", "--output", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Caller(CallerCommand::List { all: true })
        ));
        assert_eq!(cli.output, OutputFormat::Json);
        let cli = parse(&["caller", "revoke", "urn:kms:caller:old"]).unwrap();
        let Command::Caller(CallerCommand::Revoke { identity }) = cli.command else {
            panic!()
        };
        assert_eq!(identity, "urn:kms:caller:old");
        assert!(
            parse(&["caller", "revoke"]).is_err(),
            "the identity is required"
        );
    }

    #[test]
    fn help_documents_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(
            help.contains("Exit codes:")
                && help.contains("6  service unavailable")
                && help.contains("7  conflict: ABORTED"),
            "{help}"
        );
    }
}
