//! Reading client query strings: which statements of a string are schema changes. Parsed with
//! PostgreSQL's own raw parser, so quoting, comments and dollar quotes are handled exactly.

use std::ffi::CString;

use pgrx::pg_sys;

/// Statement kinds that are never part of a replicated schema change.
fn is_skipped(tag: pg_sys::NodeTag) -> bool {
    use pg_sys::NodeTag::*;
    matches!(
        tag,
        T_TransactionStmt
            | T_VariableSetStmt
            | T_VariableShowStmt
            | T_InsertStmt
            | T_UpdateStmt
            | T_DeleteStmt
            | T_MergeStmt
            | T_SelectStmt
            | T_CallStmt
            | T_CopyStmt
            | T_NotifyStmt
            | T_ListenStmt
            | T_UnlistenStmt
            | T_VacuumStmt
            | T_ExplainStmt
            | T_PrepareStmt
            | T_ExecuteStmt
            | T_DeallocateStmt
            | T_LockStmt
            | T_CheckPointStmt
            | T_DiscardStmt
            | T_FetchStmt
            | T_ClosePortalStmt
            | T_DeclareCursorStmt
    )
}

/// Whether a statement creates a temporary object (never replicated).
///
/// # Safety
///
/// `node` must be a non-NULL statement node of a raw parse tree still in memory.
unsafe fn creates_temp(node: *mut pg_sys::Node) -> bool {
    use pg_sys::NodeTag::*;
    // SAFETY: each node is cast to the struct its tag names, as the grammar built it; the
    // RangeVar and IntoClause pointers are checked for NULL before they are read.
    let rel: *mut pg_sys::RangeVar = match (*node).type_ {
        T_CreateStmt => (*(node as *mut pg_sys::CreateStmt)).relation,
        T_CreateSeqStmt => (*(node as *mut pg_sys::CreateSeqStmt)).sequence,
        T_ViewStmt => (*(node as *mut pg_sys::ViewStmt)).view,
        T_CreateTableAsStmt => {
            let into = (*(node as *mut pg_sys::CreateTableAsStmt)).into;
            if into.is_null() {
                std::ptr::null_mut()
            } else {
                (*into).rel
            }
        }
        _ => std::ptr::null_mut(),
    };
    !rel.is_null() && (*rel).relpersistence as u8 == pg_sys::RELPERSISTENCE_TEMP
}

/// The schema-changing statements of a client query string, in order, joined by `;`.
pub fn replicable_text(query: &str) -> String {
    schema_statements(query).join(";\n")
}

/// The schema-changing statements of a query string, in order: DML, transaction control, SET
/// and the like, and statements creating temporary objects are left out.
pub fn schema_statements(query: &str) -> Vec<String> {
    let Ok(c) = CString::new(query) else { return Vec::new() };
    let bytes = query.as_bytes();
    let mut out: Vec<String> = Vec::new();
    // SAFETY: raw_parser reads the NUL-terminated `c` and returns NIL or a List of RawStmt in
    // the current memory context, read only within `length`; a syntax error raises an ERROR.
    // Statement offsets index `bytes` only after being clamped to its length.
    unsafe {
        let list = pg_sys::raw_parser(c.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        if list.is_null() {
            return out;
        }
        for i in 0..(*list).length as usize {
            let raw = (*(*list).elements.add(i)).ptr_value as *mut pg_sys::RawStmt;
            let node = (*raw).stmt;
            if node.is_null() || is_skipped((*node).type_) || creates_temp(node) {
                continue;
            }
            let start = ((*raw).stmt_location.max(0) as usize).min(bytes.len());
            let end = if (*raw).stmt_len > 0 { (start + (*raw).stmt_len as usize).min(bytes.len()) } else { bytes.len() };
            let text = String::from_utf8_lossy(&bytes[start..end]);
            let text = text.trim().trim_end_matches(';').trim();
            if !text.is_empty() {
                out.push(text.to_string());
            }
        }
    }
    out
}

/// Whether a query string holds a SET statement (search_path, role, ...).
pub fn sets_anything(query: &str) -> bool {
    let Ok(c) = CString::new(query) else { return false };
    // SAFETY: as in schema_statements: NIL or a List of RawStmt read within its length, and
    // each statement node checked for NULL before its tag is read.
    unsafe {
        let list = pg_sys::raw_parser(c.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        !list.is_null()
            && (0..(*list).length as usize).any(|i| {
                let raw = (*(*list).elements.add(i)).ptr_value as *mut pg_sys::RawStmt;
                !(*raw).stmt.is_null() && (*(*raw).stmt).type_ == pg_sys::NodeTag::T_VariableSetStmt
            })
    }
}

/// The start of a long command, on one line, for messages.
pub fn abbreviate(sql: &str) -> String {
    let flat = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 400 {
        format!("{}...", flat.chars().take(400).collect::<String>())
    } else {
        flat
    }
}


/// Why a replicated query string may not run at the limited DDL level, naming the first
/// statement that is refused: role commands, ALTER SYSTEM, COPY ... PROGRAM, extensions,
/// languages and code in untrusted languages, event triggers, LOAD, databases, tablespaces,
/// foreign servers, subscriptions. `None` when every statement may run (as the limited role,
/// which still needs the rights for it).
pub fn refused_at_limited(query: &str) -> Option<String> {
    let c = match CString::new(query) {
        Ok(c) => c,
        Err(_) => return Some("a NUL byte in the command text".into()),
    };
    // SAFETY: raw_parser returns a List of RawStmt allocated in the current memory context;
    // every node is read by its tag, as PostgreSQL's own utility code does. A syntax error
    // raises an ERROR, which refuses the batch.
    unsafe {
        let list = pg_sys::raw_parser(c.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        if list.is_null() {
            return None;
        }
        for i in 0..(*list).length as usize {
            let raw = (*(*list).elements.add(i)).ptr_value as *mut pg_sys::RawStmt;
            let node = (*raw).stmt;
            if node.is_null() {
                continue;
            }
            if let Some(why) = refused_statement(node) {
                return Some(why);
            }
        }
    }
    None
}

/// The `language` option of a CREATE FUNCTION or DO, if given.
///
/// # Safety
///
/// `options` must be NIL or the DefElem list of such a raw statement, still in memory.
unsafe fn language_of(options: *mut pg_sys::List) -> Option<String> {
    // SAFETY: the list is read within its length; the grammar gives every DefElem a defname,
    // and the argument is read as a String node only after its tag says so.
    if options.is_null() {
        return None;
    }
    for i in 0..(*options).length as usize {
        let def = (*(*options).elements.add(i)).ptr_value as *mut pg_sys::DefElem;
        if !def.is_null() && std::ffi::CStr::from_ptr((*def).defname).to_bytes() == b"language" {
            let arg = (*def).arg;
            if !arg.is_null() && (*arg).type_ == pg_sys::NodeTag::T_String {
                let s = (*(arg as *mut pg_sys::String)).sval;
                return Some(std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned());
            }
        }
    }
    None
}

/// Whether a procedural language is trusted here (`pg_language.lanpltrusted`); unknown
/// languages are not.
fn language_trusted(lang: &str) -> bool {
    pgrx::spi::Spi::get_one_with_args::<bool>("SELECT lanpltrusted FROM pg_catalog.pg_language WHERE lanname = $1", &[lang.to_ascii_lowercase().into()])
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Why one raw statement is refused at the limited level (see `refused_at_limited`).
///
/// # Safety
///
/// `node` must be a non-NULL statement node of a raw parse tree still in memory.
unsafe fn refused_statement(node: *mut pg_sys::Node) -> Option<String> {
    use pg_sys::NodeTag::*;
    // SAFETY: each node is cast only to the struct its tag names; language_of gets that
    // statement's own option list.
    let what = match (*node).type_ {
        T_CreateRoleStmt | T_AlterRoleStmt | T_AlterRoleSetStmt | T_DropRoleStmt | T_GrantRoleStmt | T_ReassignOwnedStmt => "a role command",
        T_AlterSystemStmt => "ALTER SYSTEM",
        T_CopyStmt if (*(node as *mut pg_sys::CopyStmt)).is_program => "COPY ... PROGRAM",
        T_CreateExtensionStmt | T_AlterExtensionStmt | T_AlterExtensionContentsStmt => "an extension command",
        T_CreatePLangStmt => "CREATE LANGUAGE",
        T_CreateEventTrigStmt | T_AlterEventTrigStmt => "an event trigger command",
        T_LoadStmt => "LOAD",
        T_CreatedbStmt | T_AlterDatabaseStmt | T_AlterDatabaseSetStmt | T_AlterDatabaseRefreshCollStmt | T_DropdbStmt => "a database command",
        T_CreateTableSpaceStmt | T_DropTableSpaceStmt | T_AlterTableSpaceOptionsStmt => "a tablespace command",
        T_CreateFdwStmt | T_AlterFdwStmt | T_CreateForeignServerStmt | T_AlterForeignServerStmt | T_CreateUserMappingStmt | T_AlterUserMappingStmt => "a foreign-data command",
        T_CreateSubscriptionStmt | T_AlterSubscriptionStmt | T_DropSubscriptionStmt => "a subscription command",
        T_VariableSetStmt => "SET",
        T_CreateFunctionStmt => {
            let lang = language_of((*(node as *mut pg_sys::CreateFunctionStmt)).options).unwrap_or_else(|| "sql".into());
            if language_trusted(&lang) {
                return None;
            }
            return Some(format!("a function in the untrusted language {lang}"));
        }
        T_DoStmt => {
            let lang = language_of((*(node as *mut pg_sys::DoStmt)).args).unwrap_or_else(|| "plpgsql".into());
            if language_trusted(&lang) {
                return None;
            }
            return Some(format!("a DO block in the untrusted language {lang}"));
        }
        _ => return None,
    };
    Some(what.to_string())
}

/// A SQL string literal, as PostgreSQL's `quote_literal`: quotes doubled; a value with a
/// backslash becomes an `E'...'` literal with its backslashes doubled.
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    if s.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in s.chars() {
        if c == '\'' || c == '\\' {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// A column's value as its type's output function prints it (as the capture trigger does),
/// NULL kept: `format('%s', ...)` calls the output function, where a cast to text may not
/// (booleans cast to 'true', char(n) loses its padding) and could run a user's cast function.
pub fn output_text(col: &str) -> String {
    let c = quote_ident(col);
    format!("CASE WHEN {c} IS NULL THEN NULL ELSE pg_catalog.format('%s', {c}) END")
}

/// A text[] literal of `items` (each double-quoted, with its quotes and backslashes escaped),
/// for a text parameter that the server reads as text[].
pub fn text_array_literal(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    format!("{{{}}}", quoted.join(","))
}

/// A quoted identifier: always in double quotes, quotes doubled (PostgreSQL reads it back as
/// exactly this name).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

