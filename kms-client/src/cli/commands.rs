//! Runs one parsed `kmsctl` command against a connected client and prints its result. The key
//! lifecycle and approval commands are in [`super::lifecycle`], `rewrap` in [`super::rewrap`].
//!
//! Reads and writes files (`-` is stdin/stdout). Plaintext data keys are printed only by the
//! commands that exist to return them (`datakey generate` without `--no-plaintext`, `datakey
//! decrypt`); decrypted payloads are written with mode 0600.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use kms_client::names::classification_name;
use kms_client::{Delivery, KeyFilter, KmsClient, RecipientKey};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::args::{Command, DataKeyCommand, DecryptArgs, EncryptArgs, KeyCommand, OutputFormat};
use super::{audit, callers, lifecycle, output, rewrap, CliError};

pub async fn run(
    client: &KmsClient,
    command: Command,
    format: OutputFormat,
) -> Result<(), CliError> {
    match command {
        Command::Key(KeyCommand::Create {
            name,
            level,
            purpose,
            rotation_days,
        }) => {
            let key = client
                .create_key(&name, level, purpose, rotation_days)
                .await?;
            print_key(&key, format)
        }
        Command::Key(KeyCommand::Get { name }) => {
            let key = client.get_key(&name).await?;
            print_key(&key, format)
        }
        Command::Key(KeyCommand::List { level, prefix }) => {
            let keys = client
                .list_keys(&KeyFilter {
                    classification: level,
                    name_prefix: prefix,
                })
                .await?;
            match format {
                OutputFormat::Json => print_json(&output::key_list_json(&keys)),
                OutputFormat::Table => print_stdout(output::key_list_table(&keys).as_bytes()),
            }
        }
        Command::DataKey(DataKeyCommand::Generate {
            key,
            context,
            no_plaintext,
            recipient_key,
        }) => {
            let context = context.to_map()?;
            let recipient_key = recipient_key.as_deref().map(load_recipient_key).transpose()?;
            let delivery = match (&recipient_key, no_plaintext) {
                (Some(r), _) => Delivery::ToRecipient(r),
                (None, true) => Delivery::WrappedOnly,
                (None, false) => Delivery::PlaintextAndWrapped,
            };
            let generated = client.generate_data_key(&key, &context, delivery).await?;
            let plaintext = generated
                .plaintext
                .as_ref()
                .map(|k| Zeroizing::new(BASE64.encode(k.as_slice())));
            print_fields(
                vec![
                    ("key_id", Some(json!(generated.key_id))),
                    ("key_version", Some(json!(generated.key_version))),
                    (
                        "wrapped_data_key",
                        Some(json!(output::base64(&generated.wrapped))),
                    ),
                    (
                        "plaintext_data_key",
                        plaintext.as_ref().map(|p| json!(p.as_str())),
                    ),
                ],
                format,
            )
        }
        Command::DataKey(DataKeyCommand::Decrypt {
            wrapped,
            input,
            context,
            key,
            recipient_key,
        }) => {
            let context = context.to_map()?;
            let blob = match (wrapped, input) {
                (Some(text), _) => BASE64.decode(text.trim()).map_err(|source| {
                    CliError::Usage(super::UsageError::WrappedNotBase64(source))
                })?,
                (None, Some(path)) => read_input(&path)?.to_vec(),
                // clap requires one of the two.
                (None, None) => return Err(CliError::Usage(super::UsageError::NoWrappedBlob)),
            };
            let recipient_key = recipient_key.as_deref().map(load_recipient_key).transpose()?;
            let decrypted = client
                .decrypt_data_key(&blob, &context, key.as_deref(), recipient_key.as_ref())
                .await?;
            let plaintext = Zeroizing::new(BASE64.encode(decrypted.plaintext.as_slice()));
            print_fields(
                vec![
                    ("key_id", Some(json!(decrypted.key_id))),
                    ("key_version", Some(json!(decrypted.key_version))),
                    (
                        "classification",
                        Some(json!(classification_name(decrypted.classification.into()))),
                    ),
                    ("plaintext_data_key", Some(json!(plaintext.as_str()))),
                ],
                format,
            )
        }
        Command::Key(KeyCommand::Lifecycle(command)) => {
            lifecycle::key(client, command, format).await
        }
        Command::Approval(command) => lifecycle::approval(client, command, format).await,
        Command::Audit(command) => audit::online(client, command, format).await,
        Command::Caller(command) => callers::run(client, command, format).await,
        Command::Token(command) => super::token::run(client, command, format).await,
        // Offline commands are run before connecting (see `cli::run`).
        Command::RecipientKey(_) | Command::DataKey(DataKeyCommand::Open { .. }) => Ok(()),
        Command::Encrypt(args) => encrypt(client, args, format).await,
        Command::Decrypt(args) => decrypt(client, args, format).await,
        Command::Rewrap(args) => rewrap::run(client, args, format).await,
    }
}

async fn encrypt(
    client: &KmsClient,
    args: EncryptArgs,
    format: OutputFormat,
) -> Result<(), CliError> {
    let context = args.context.to_map()?;
    let plaintext = read_input(&args.in_file)?;
    let response = client.encrypt(&args.key, &plaintext, &context).await?;
    write_output(&args.out_file, &response.ciphertext, false)?;
    summary(
        &args.out_file,
        response.key_id,
        response.key_version,
        response.ciphertext.len(),
        format,
    )
}

async fn decrypt(
    client: &KmsClient,
    args: DecryptArgs,
    format: OutputFormat,
) -> Result<(), CliError> {
    let context: BTreeMap<String, String> = args.context.to_map()?;
    let ciphertext = read_input(&args.in_file)?;
    let decrypted = client
        .decrypt(&ciphertext, &context, args.key.as_deref())
        .await?;
    write_output(&args.out_file, &decrypted.plaintext, true)?;
    summary(
        &args.out_file,
        decrypted.key_id,
        decrypted.key_version,
        decrypted.plaintext.len(),
        format,
    )
}

/// After encrypt/decrypt: what was written, unless the data itself went to stdout.
fn summary(
    out: &Path,
    key_id: String,
    key_version: u32,
    bytes: usize,
    format: OutputFormat,
) -> Result<(), CliError> {
    if is_stdio(out) {
        return Ok(());
    }
    print_fields(
        vec![
            ("key_id", Some(json!(key_id))),
            ("key_version", Some(json!(key_version))),
            ("out", Some(json!(out.display().to_string()))),
            ("bytes", Some(json!(bytes))),
        ],
        format,
    )
}

fn print_key(key: &kms_client::proto::Key, format: OutputFormat) -> Result<(), CliError> {
    match format {
        OutputFormat::Json => print_json(&output::key_json(key)),
        OutputFormat::Table => print_stdout(output::key_table(key).as_bytes()),
    }
}

fn print_fields(fields: Vec<(&str, Option<Value>)>, format: OutputFormat) -> Result<(), CliError> {
    match format {
        OutputFormat::Json => print_json(&output::object(fields)),
        OutputFormat::Table => {
            print_stdout(Zeroizing::new(output::object_table(&fields)).as_bytes())
        }
    }
}

pub(super) fn print_json(value: &Value) -> Result<(), CliError> {
    let mut text = Zeroizing::new(serde_json::to_string_pretty(value).map_err(CliError::Json)?);
    text.push('\n');
    print_stdout(text.as_bytes())
}

pub(super) fn print_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(|source| CliError::Io {
            what: "write",
            path: PathBuf::from("<stdout>"),
            source,
        })
}

pub(super) fn is_stdio(path: &Path) -> bool {
    path.as_os_str() == "-"
}

fn read_input(path: &Path) -> Result<Zeroizing<Vec<u8>>, CliError> {
    let mut bytes = Zeroizing::new(Vec::new());
    let result = if is_stdio(path) {
        std::io::stdin().lock().read_to_end(&mut bytes).map(|_| ())
    } else {
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map(|_| ())
    };
    result.map_err(|source| CliError::Io {
        what: "read",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(bytes)
}

fn write_output(path: &Path, bytes: &[u8], private: bool) -> Result<(), CliError> {
    let io_error = |source| CliError::Io {
        what: "write",
        path: path.to_path_buf(),
        source,
    };
    if is_stdio(path) {
        let mut stdout = std::io::stdout().lock();
        return stdout
            .write_all(bytes)
            .and_then(|()| stdout.flush())
            .map_err(io_error);
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(io_error)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_error)
}

/// A recipient private key from a PKCS#8 PEM file.
pub fn load_recipient_key(path: &std::path::Path) -> Result<RecipientKey, CliError> {
    let pem = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|source| CliError::Io { what: "read the recipient key", path: path.to_owned(), source })?,
    );
    Ok(RecipientKey::from_pkcs8_pem(&pem)?)
}

/// `kmsctl recipient-key generate` and `kmsctl datakey open`: no connection.
pub fn offline(command: &Command, format: OutputFormat) -> Option<Result<(), CliError>> {
    match command {
        Command::RecipientKey(super::args::LocalRecipientKeyCommand::Generate { out, public_out }) => {
            Some(generate_recipient_key(out, public_out, format))
        }
        Command::DataKey(DataKeyCommand::Open { sealed, key_id, key_version, context, recipient_key }) => {
            Some((|| {
                let context = context.to_map()?;
                let sealed = BASE64
                    .decode(sealed.trim())
                    .map_err(|source| CliError::Usage(super::UsageError::WrappedNotBase64(source)))?;
                let recipient = load_recipient_key(recipient_key)?;
                let binding = kms_client::SealBinding::new(key_id, *key_version, &context).map_err(kms_client::ClientError::from)?;
                let key = recipient.open(&sealed, &binding)?;
                let plaintext = Zeroizing::new(BASE64.encode(key.as_slice()));
                print_fields(vec![("plaintext_data_key", Some(json!(plaintext.as_str())))], format)
            })())
        }
        _ => None,
    }
}

fn generate_recipient_key(out: &std::path::Path, public_out: &std::path::Path, format: OutputFormat) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = RecipientKey::generate()?;
    let private = key.private_key_pem()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|source| CliError::Io { what: "create the private key file", path: out.to_owned(), source })?;
    file.write_all(private.as_bytes())
        .map_err(|source| CliError::Io { what: "write the private key file", path: out.to_owned(), source })?;
    std::fs::write(public_out, key.public_key_pem()?)
        .map_err(|source| CliError::Io { what: "write the public key file", path: public_out.to_owned(), source })?;
    print_fields(
        vec![
            ("fingerprint", Some(json!(key.fingerprint_hex()))),
            ("private_key_file", Some(json!(out.display().to_string()))),
            ("public_key_file", Some(json!(public_out.display().to_string()))),
        ],
        format,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_and_private_outputs_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.bin");
        write_output(&path, b"hello", true).unwrap();
        assert_eq!(read_input(&path).unwrap().as_slice(), b"hello");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[test]
    fn missing_input_file_names_the_path() {
        let err = read_input(Path::new("/definitely/not/here")).unwrap_err();
        assert!(err.to_string().contains("/definitely/not/here"), "{err}");
        assert_eq!(err.exit_code(), super::super::exit::OTHER);
    }
}

