/* SmartEdu Tutor Chat: a course's documents in the teacher dashboard (/teacher).
 *
 * The tutor grounds its answers in them. A teacher of the course or an administrator lists, reads, adds (a
 * .txt or .md file, or pasted text), replaces and deletes them over the HTTP API (/api/courses/{id}/documents)
 * with the dashboard's token as `Authorization: Bearer`. No cookie goes with these requests, so there is no
 * session for another site to ride on and no CSRF token to send. Every error is shown in plain words where
 * the action was taken, and announced. Loaded before teacher.js, which makes the panel and opens it.
 */
(function () {
  'use strict';

  var ns = (window.SmartEdu = window.SmartEdu || {});
  var h = ns.common.h;
  var MAX_FILE_BYTES = 800000; // the server's 200,000 characters, at 4 bytes each in UTF-8 at most
  var TEXT_FILE = /\.(txt|md|markdown)$/i;
  // Codes whose message is for developers: what they mean for the teacher. The others (a name too long, a
  // document too large, one not found) carry the server's own message.
  var PLAIN = {
    unauthorized: 'your sign-in has expired; open the dashboard again from your school\u2019s site',
    forbidden: 'you may not manage the documents of this course',
    rate_limited: 'too many requests; try again in a moment',
    internal: 'something went wrong on the server; try again',
    busy: 'the server is busy; try again in a moment',
    network: 'the server could not be reached; check the connection and try again',
  };

  function quoted(name) { return '\u201c' + name + '\u201d'; }

  function count(n, unit) { return n.toLocaleString('en') + ' ' + unit + (n === 1 ? '' : 's'); }

  function explain(error) {
    var plain = PLAIN[error.code];
    if (!plain) return error.message;
    return error.code === 'forbidden' && error.message ? plain + ' (' + error.message + ')' : plain;
  }

  // `{status, json}` of the answer, or an Error with the JSON error's `code` and `message` (`network`: no
  // answer at all).
  function api(token, method, path, body) {
    var headers = { Authorization: 'Bearer ' + token, Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    var init = { method: method, headers: headers, credentials: 'omit', cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body) };
    return fetch(path, init).then(function (response) {
      return response.json().catch(function () { return null; }).then(function (json) {
        if (response.ok && json) return { status: response.status, json: json };
        var detail = json && json.error && typeof json.error === 'object' ? json.error : {};
        var error = new Error(typeof detail.message === 'string' ? detail.message
          : 'the server answered with an error (HTTP ' + response.status + ')');
        error.code = typeof detail.code === 'string' ? detail.code : 'http';
        throw error;
      });
    }, function () {
      var error = new Error('no answer');
      error.code = 'network';
      throw error;
    });
  }

  function Documents(root, dashboard) {
    var $ = function (selector) { return root.querySelector(selector); };
    this.root = root;
    this.dashboard = dashboard; // token, announce(text), hideDocuments()
    this.course = null;
    this.generation = 0; // answers for a course no longer shown are dropped
    this.shown = null;   // the document in the viewer, with its body
    this.editing = null; // the document the form replaces; null: the form adds one
    this.fileName = '';  // the name the last file chosen filled in
    this.listFailed = false;
    this.ui = {
      title: $('#st-docs-title'), listMsg: $('.st-docs__list-msg'), state: $('.st-docs__state'),
      table: $('.st-docs__table'), rows: $('tbody'), confirm: $('.st-docs__confirm'),
      viewer: $('.st-docs__viewer'), viewerTitle: $('#st-docs-viewer-title'), meta: $('.st-docs__meta'),
      text: $('.st-docs__text'), edit: $('.st-docs__edit'),
      remove: $('.st-docs__delete'), form: $('.st-docs__form'), formTitle: $('#st-docs-form-title'),
      file: $('#st-docs-file'), name: $('#st-docs-name'), body: $('#st-docs-body'),
      submit: $('.st-docs__submit'), cancel: $('.st-docs__cancel'), formMsg: $('.st-docs__form-msg'),
    };
    var self = this;
    var ui = this.ui;
    $('.st-docs__close').addEventListener('click', function () { dashboard.hideDocuments(); });
    $('.st-docs__hide').addEventListener('click', function () { self.closeViewer(); });
    ui.edit.addEventListener('click', function () { self.startReplacing(self.shown); });
    ui.remove.addEventListener('click', function () { self.askDelete(self.shown, ui.remove); });
    ui.cancel.addEventListener('click', function () {
      self.resetForm();
      (ui.viewer.hidden ? ui.formTitle : ui.edit).focus();
    });
    ui.file.addEventListener('change', function () { self.readFile(); });
    ui.form.addEventListener('submit', function (event) { event.preventDefault(); self.save(false); });
    root.addEventListener('keydown', function (event) {
      if (event.key === 'Escape' && !event.defaultPrevented && !/^(INPUT|TEXTAREA)$/.test(event.target.nodeName)) {
        dashboard.hideDocuments();
      }
    });
  }

  Documents.prototype.open = function (course) {
    this.course = course;
    this.generation += 1;
    this.root.hidden = false;
    this.ui.title.textContent = 'Documents of ' + course.title;
    this.closeViewer();
    this.resetForm();
    this.say(this.ui.formMsg, null);
    this.say(this.ui.listMsg, null);
    this.ui.rows.textContent = '';
    this.ui.table.hidden = true;
    this.ui.title.focus();
    this.load();
  };

  Documents.prototype.hide = function () {
    this.course = null;
    this.generation += 1;
    this.root.hidden = true;
  };

  Documents.prototype.path = function (id) {
    return '/api/courses/' + encodeURIComponent(this.course.id) + '/documents' + (id == null ? '' : '/' + id);
  };

  // A request for the course shown now: `done(json, status)` and `failed(error)` run only if it still is.
  Documents.prototype.call = function (method, path, body, done, failed) {
    var generation = this.generation;
    var self = this;
    api(this.dashboard.token, method, path, body).then(function (answer) {
      if (self.generation === generation) done(answer.json, answer.status);
    }, function (error) {
      if (self.generation === generation) failed(error);
    });
  };

  // A message under what it is about: `tone` error or ok, `actions` [{label, run, name?}]; null text clears it.
  Documents.prototype.say = function (box, text, tone, actions) {
    box.textContent = '';
    box.hidden = !text;
    if (!text) return;
    box.setAttribute('data-tone', tone || 'error');
    box.appendChild(h('p', { className: 'st-docs__msg-text', text: text }));
    (actions || []).forEach(function (action) {
      var button = h('button', { type: 'button', className: 'se-link-button', text: action.label,
        'aria-label': action.name });
      button.addEventListener('click', action.run);
      box.appendChild(button);
    });
    if (box.scrollIntoView) box.scrollIntoView({ block: 'nearest' });
    this.dashboard.announce(text);
  };

  Documents.prototype.load = function () {
    var ui = this.ui;
    var self = this;
    ui.state.hidden = false;
    ui.state.textContent = 'Loading the documents\u2026';
    this.call('GET', this.path(), undefined, function (json) {
      if (self.listFailed) self.say(ui.listMsg, null);
      self.listFailed = ui.form.hidden = false;
      self.render(Array.isArray(json.documents) ? json.documents : []);
    }, function (error) {
      ui.state.hidden = true;
      ui.table.hidden = true;
      self.listFailed = true;
      // Refused (not a teacher of the course, the sign-in expired): there is nothing to add to either.
      ui.form.hidden = error.code === 'forbidden' || error.code === 'unauthorized';
      self.say(ui.listMsg, 'The documents could not be loaded: ' + explain(error) + '.', 'error',
        [{ label: 'Try again', run: function () { self.load(); } }]);
    });
  };

  Documents.prototype.render = function (documents) {
    var ui = this.ui;
    var self = this;
    ui.rows.textContent = '';
    documents.forEach(function (doc) {
      var view = h('button', { type: 'button', className: 'se-link-button st-docs__name', text: doc.name,
        'aria-label': 'Read ' + doc.name });
      view.addEventListener('click', function () { self.view(doc); });
      var remove = h('button', { type: 'button', className: 'se-link-button', text: 'Delete',
        'aria-label': 'Delete ' + doc.name });
      remove.addEventListener('click', function () { self.askDelete(doc, remove); });
      ui.rows.appendChild(h('tr', { 'data-id': doc.id }, [
        h('th', { scope: 'row' }, [view]),
        h('td', null, [h('span', { text: count(doc.chars, 'character') + ',' }), ' ',
          h('span', { text: count(doc.passages, 'passage') })]),
        h('td', null, [remove]),
      ]));
    });
    ui.table.hidden = documents.length === 0;
    ui.state.hidden = documents.length > 0;
    ui.state.textContent = documents.length ? '' : 'No documents yet. Add one below.';
  };

  Documents.prototype.view = function (doc) {
    var ui = this.ui;
    var self = this;
    this.call('GET', this.path(doc.id), undefined, function (json) {
      self.shown = json;
      ui.viewer.hidden = false;
      ui.viewerTitle.textContent = json.name;
      ui.meta.textContent = count(json.chars, 'character') + ' in ' + count(json.passages, 'passage');
      ui.text.textContent = json.body;
      ui.text.setAttribute('aria-label', 'Text of ' + json.name);
      ui.edit.setAttribute('aria-label', 'Replace the text of ' + json.name);
      ui.remove.setAttribute('aria-label', 'Delete ' + json.name);
      ui.viewerTitle.focus();
    }, function (error) {
      self.say(ui.listMsg, quoted(doc.name) + ' could not be opened: ' + explain(error) + '.');
      if (error.code === 'not_found') self.load();
    });
  };

  Documents.prototype.closeViewer = function () {
    this.shown = null;
    this.ui.viewer.hidden = true;
    this.ui.confirm.hidden = true;
  };

  Documents.prototype.startReplacing = function (doc) {
    var ui = this.ui;
    this.editing = doc;
    ui.formTitle.textContent = 'Replace ' + quoted(doc.name);
    ui.name.value = doc.name;
    ui.body.value = doc.body;
    ui.submit.textContent = 'Save';
    ui.cancel.hidden = false;
    this.say(ui.formMsg, null);
    ui.formTitle.focus();
  };

  Documents.prototype.resetForm = function () {
    var ui = this.ui;
    this.editing = null;
    ui.form.reset();
    ui.formTitle.textContent = 'Add a document';
    ui.submit.textContent = 'Upload';
    ui.submit.disabled = false; // a save still waiting when the panel closed never answers here
    ui.cancel.hidden = true;
  };

  // A chosen file fills in the text, and the name when it was left empty (or was the last file's).
  Documents.prototype.readFile = function () {
    var ui = this.ui;
    var file = ui.file.files && ui.file.files[0];
    if (!file) return;
    var self = this;
    if (!TEXT_FILE.test(file.name) && !/^text\//.test(file.type)) {
      this.say(ui.formMsg, quoted(file.name) + ' is not a text file: choose a .txt or .md file.');
      return;
    }
    if (file.size > MAX_FILE_BYTES) {
      this.say(ui.formMsg, quoted(file.name) + ' is too large: a document holds at most 200,000 characters.');
      return;
    }
    file.text().then(function (text) {
      var name = file.name.replace(TEXT_FILE, '');
      if (!self.editing && (!ui.name.value || ui.name.value === self.fileName)) ui.name.value = name;
      self.fileName = name;
      ui.body.value = text;
      self.say(ui.formMsg, 'Read ' + quoted(file.name) + ': ' + count(Array.from(text).length, 'character') +
        '. Check the name and the text, then ' + (self.editing ? 'save.' : 'upload.'), 'ok');
    }, function () {
      self.say(ui.formMsg, quoted(file.name) + ' could not be read.');
    });
  };

  // Add (POST; `replace`: over the document of that name) or replace the one being edited (PUT).
  Documents.prototype.save = function (replace) {
    var ui = this.ui;
    var self = this;
    var name = ui.name.value;
    var body = ui.body.value;
    var editing = this.editing;
    var path = editing ? this.path(editing.id) : this.path() + (replace ? '?replace=true' : '');
    ui.submit.disabled = true;
    this.call(editing ? 'PUT' : 'POST', path, { name: name, body: body }, function (doc, status) {
      self.resetForm();
      var size = ': ' + count(doc.chars, 'character') + ' in ' + count(doc.passages, 'passage') + '.';
      // A POST of a name and text already there (a second upload of the same file) is a 200: nothing changed.
      self.say(ui.formMsg, editing ? 'Saved ' + quoted(doc.name) + size
        : status === 201 ? 'Added ' + quoted(doc.name) + size
        : replace ? 'Replaced the text of ' + quoted(doc.name) + size
        : quoted(doc.name) + ' is already there with this text: nothing changed.', 'ok');
      if (self.shown && self.shown.id === doc.id) self.view(doc);
      self.load();
    }, function (error) {
      ui.submit.disabled = false;
      if (error.code === 'conflict' && !editing) {
        self.say(ui.formMsg, 'This course already has a document named ' + quoted(name.trim()) + '. Replace its ' +
          'text with this one, or change the name to add it as another document.', 'error', [
          { label: 'Replace ' + quoted(name.trim()), run: function () { self.save(true); } },
          { label: 'Change the name', run: function () { self.say(ui.formMsg, null); ui.name.focus(); } },
        ]);
        return;
      }
      var verb = editing ? 'saved' : 'uploaded';
      var reason = error.code === 'conflict' ? 'another document of this course is already named ' +
        quoted(name.trim()) + '; choose another name' : explain(error);
      self.say(ui.formMsg, 'The document could not be ' + verb + ': ' + reason + '.');
    });
  };

  // Deleting asks first, next to the list; Cancel has the focus, so a stray Enter deletes nothing.
  Documents.prototype.askDelete = function (doc, trigger) {
    var ui = this.ui;
    var self = this;
    ui.confirm.hidden = false;
    this.say(ui.confirm, 'Delete ' + quoted(doc.name) + '? The tutor stops using it at once. This cannot be undone.',
      'warn', [
        { label: 'Delete', name: 'Delete ' + doc.name + ' for good', run: function () { self.remove(doc, trigger); } },
        { label: 'Cancel', run: function () { self.say(ui.confirm, null); trigger.focus(); } },
      ]);
    ui.confirm.lastChild.focus();
  };

  Documents.prototype.remove = function (doc, trigger) {
    var ui = this.ui;
    var self = this;
    this.say(ui.confirm, null);
    this.call('DELETE', this.path(doc.id), undefined, function () {
      if (self.shown && self.shown.id === doc.id) self.closeViewer();
      self.say(ui.listMsg, 'Deleted ' + quoted(doc.name) + '.', 'ok');
      ui.title.focus();
      self.load();
    }, function (error) {
      self.say(ui.listMsg, quoted(doc.name) + ' could not be deleted: ' + explain(error) + '.');
      if (error.code === 'not_found') self.load();
      else if (trigger.isConnected) trigger.focus();
    });
  };

  ns.CourseDocuments = Documents;
})();
