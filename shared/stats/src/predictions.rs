//! Reading a predictions file: one row per patient with `score` (higher = higher risk), `label` (0/1,
//! empty = unlabelled), `time` (days, ≥ 0), `event` (0/1) and optionally `group`. Other columns (a
//! patient id, say) are ignored. Every error names the file, the line and the column.

use serde::{Deserialize, Serialize};
use std::io::Read;

/// Predictions and outcomes, one entry per patient, in file order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Predictions {
    /// Risk score (higher = higher risk).
    pub score: Vec<f64>,
    /// Binary outcome; `None` = unlabelled (e.g. censored before the landmark).
    pub label: Vec<Option<bool>>,
    /// Follow-up time.
    pub time: Vec<f64>,
    /// Whether follow-up ended with the event.
    pub event: Vec<bool>,
    /// Group per patient, when the file has a `group` column.
    pub group: Option<Vec<String>>,
}

impl Predictions {
    /// Number of patients.
    pub fn len(&self) -> usize {
        self.score.len()
    }

    /// Whether there are no patients.
    pub fn is_empty(&self) -> bool {
        self.score.is_empty()
    }
}

/// What is wrong with a predictions file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PredictionsError {
    /// The file could not be read or is not valid CSV.
    #[error("{file}: cannot be read as CSV: {message}")]
    Csv {
        /// The file.
        file: String,
        /// The CSV reader's message (it names the line).
        message: String,
    },
    /// A required column is missing.
    #[error("{file}: missing column '{column}' (the header has: {header}); required: score, label, time, event")]
    MissingColumn {
        /// The file.
        file: String,
        /// The missing column.
        column: &'static str,
        /// The columns found.
        header: String,
    },
    /// A column name appears twice.
    #[error("{file}: column '{column}' appears more than once in the header")]
    DuplicateColumn {
        /// The file.
        file: String,
        /// The column.
        column: String,
    },
    /// A cell has a value the column does not allow.
    #[error("{file}, line {line}, column '{column}': {problem}")]
    Cell {
        /// The file.
        file: String,
        /// 1-based line in the file (the header is line 1).
        line: u64,
        /// The column.
        column: &'static str,
        /// What is wrong and what is expected.
        problem: String,
    },
    /// No data rows.
    #[error("{file}: no patients (only a header, or an empty file)")]
    Empty {
        /// The file.
        file: String,
    },
}

const REQUIRED: [&str; 4] = ["score", "label", "time", "event"];

/// Reads predictions from CSV text; `file` names the source in errors.
///
/// # Errors
/// See [`PredictionsError`]: unreadable CSV, a missing or duplicated column, a non-numeric or
/// out-of-domain cell (score not finite, label or event not 0/1, time negative), an empty group, or no rows.
pub fn read_predictions<R: Read>(reader: R, file: &str) -> Result<Predictions, PredictionsError> {
    let mut csv = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(reader);
    let csv_err = |e: csv::Error| PredictionsError::Csv { file: file.to_owned(), message: e.to_string() };
    let header: Vec<String> = csv.headers().map_err(csv_err)?.iter().map(|h| h.trim().to_owned()).collect();
    for (k, h) in header.iter().enumerate() {
        if header[..k].contains(h) {
            return Err(PredictionsError::DuplicateColumn { file: file.to_owned(), column: h.clone() });
        }
    }
    let find = |name: &str| header.iter().position(|h| h == name);
    let mut idx = [0usize; 4];
    for (slot, name) in idx.iter_mut().zip(REQUIRED) {
        *slot = find(name).ok_or_else(|| PredictionsError::MissingColumn {
            file: file.to_owned(),
            column: name,
            header: header.join(", "),
        })?;
    }
    let group_idx = find("group");
    let mut out = Predictions { group: group_idx.map(|_| Vec::new()), ..Default::default() };
    for record in csv.records() {
        let record = record.map_err(csv_err)?;
        let line = record.position().map_or(0, |p| p.line());
        let cell = |k: usize| record.get(k).unwrap_or("").trim();
        let bad = |column: &'static str, problem: String| PredictionsError::Cell {
            file: file.to_owned(),
            line,
            column,
            problem,
        };
        let number = |column: &'static str, k: usize| -> Result<f64, PredictionsError> {
            let text = cell(k);
            match text.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ if text.is_empty() => Err(bad(column, "empty; a number is required".into())),
                _ => Err(bad(column, format!("'{text}' is not a finite number"))),
            }
        };
        let zero_one = |column: &'static str, text: &str| -> Result<bool, PredictionsError> {
            match text.parse::<f64>() {
                Ok(0.0) => Ok(false),
                Ok(1.0) => Ok(true),
                _ => Err(bad(column, format!("'{text}' is not 0 or 1"))),
            }
        };
        out.score.push(number("score", idx[0])?);
        let label = cell(idx[1]);
        out.label.push(if label.is_empty() { None } else { Some(zero_one("label", label)?) });
        let time = number("time", idx[2])?;
        if time < 0.0 {
            return Err(bad("time", format!("{time} is negative; follow-up time must be 0 or more")));
        }
        out.time.push(time);
        let event = cell(idx[3]);
        if event.is_empty() {
            return Err(bad("event", "empty; 0 (censored) or 1 (event) is required".into()));
        }
        out.event.push(zero_one("event", event)?);
        if let (Some(groups), Some(k)) = (out.group.as_mut(), group_idx) {
            let g = cell(k);
            if g.is_empty() {
                return Err(bad("group", "empty; every row needs a group when the column is present".into()));
            }
            groups.push(g.to_owned());
        }
    }
    if out.is_empty() {
        return Err(PredictionsError::Empty { file: file.to_owned() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Predictions, PredictionsError> {
        read_predictions(text.as_bytes(), "p.csv")
    }

    #[test]
    fn reads_unlabelled_rows_and_ignores_other_columns() {
        let p = read("id,score,label,time,event\na,0.2,1,30,1\nb,0.1,,400,0\n").unwrap();
        assert_eq!(p.label, vec![Some(true), None]);
        assert_eq!(p.time, vec![30.0, 400.0]);
        assert_eq!(p.event, vec![true, false]);
        assert!(p.group.is_none());
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let err = read("score,label,time,event\n0.2,1,30,1\n0.3,2,30,1\n").unwrap_err();
        assert_eq!(err.to_string(), "p.csv, line 3, column 'label': '2' is not 0 or 1");
        let err = read("score,label,time,event\nhigh,1,30,1\n").unwrap_err();
        assert_eq!(err.to_string(), "p.csv, line 2, column 'score': 'high' is not a finite number");
        let err = read("score,label,time,event\nNaN,1,30,1\n").unwrap_err();
        assert!(err.to_string().contains("'NaN' is not a finite number"), "{err}");
        let err = read("score,label,time,event\n0.1,1,-3,1\n").unwrap_err();
        assert!(err.to_string().contains("column 'time': -3 is negative"), "{err}");
        let err = read("score,label,event\n0.1,1,1\n").unwrap_err();
        assert!(err.to_string().contains("missing column 'time'"), "{err}");
        let err = read("score,label,time,event,group\n0.1,1,3,1,\n").unwrap_err();
        assert!(err.to_string().contains("column 'group'"), "{err}");
        assert!(matches!(read("score,label,time,event\n").unwrap_err(), PredictionsError::Empty { .. }));
        assert!(matches!(read("").unwrap_err(), PredictionsError::MissingColumn { .. }));
        assert!(matches!(
            read("score,score,label,time,event\n").unwrap_err(),
            PredictionsError::DuplicateColumn { .. }
        ));
    }
}
