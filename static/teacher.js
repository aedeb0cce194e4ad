/* SmartEdu Tutor Chat: the teacher's live dashboard (/teacher).
 *
 * One WebSocket (protocol v1): `hello` with the teacher's token, then `watch` for every course the
 * teacher teaches. Each course's `snapshot` lists the students online; `event` frames keep that list
 * current (`joined`, `left`) and carry every frame of every conversation in the course (`frame`), so
 * the dashboard knows at all times who is waiting, whose answer is streaming and what was flagged.
 * Opening a conversation loads its transcript over REST and merges the live frames into it.
 * The DOM is built with createElement/textContent only (strict CSP: no inline script or style, no
 * innerHTML); tutor and teacher text goes through markdown.js. The token lives in memory only.
 */
(function () {
  'use strict';

  var ns = (window.SmartEdu = window.SmartEdu || {});
  var common = ns.common; // common.js
  var newId = common.newId, cpLength = common.cpLength, cpSlice = common.cpSlice, h = common.h;
  var formatTime = common.formatTime;
  var FINAL = { complete: true, stopped: true, interrupted: true, failed: true };
  var RESNAPSHOT_MS = 60000; // presence of a replica that died ends without a `left` event
  var RESYNC_SPREAD_MS = 1500; // re-reads after a `resync` start at random within this
  var PAGE = 50;
  var KEEP_MESSAGES = 300; // per conversation that is not open
  var STATE_LABEL = {
    idle: 'Idle',
    waiting: 'Tutor typing',
    streaming: 'Answer streaming',
    unanswered: 'Waiting for your reply',
  };
  var ATTENTION_LABEL = {
    safety_block: 'Flagged: safety block',
    failed: 'Answer failed',
    interrupted: 'Answer interrupted',
  };
  var STATUS_TEXT = {
    waiting: 'Tutor typing\u2026',
    streaming: 'Streaming',
    stopped: 'Stopped by the student',
    interrupted: 'Interrupted',
    failed: 'The answer could not be completed',
    sending: 'Sending\u2026',
    queued: 'Waiting for connection \u2014 will send automatically',
    rejected: 'Not sent',
  };

  // How an answer ended beyond its status, as its `done` or history row says: cut short by the output limit,
  // stopped by the safety filter, or failed for a reason asking again will not fix.
  function outcome(msg, f) {
    msg.truncated = f.truncated === true;
    msg.blocked = f.blocked === true;
    msg.failure = f.retryable === false && typeof f.error === 'string' ? f.error : null;
  }
  var FAILED_FOR_GOOD = {
    ai_declined: 'The tutor declined this question',
    ai_rejected: 'The AI provider could not process this conversation (for example, too long for the model)',
    ai_unavailable: 'The answer could not be completed: the AI provider refuses this deployment\u2019s settings',
  };

  /* ---- helpers --------------------------------------------------------------------------------- */

  function $(root, selector) { return root.querySelector(selector); }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function plainText(text, max) {
    var flat = String(text || '').replace(/\s+/g, ' ').trim();
    return flat.length > max ? flat.slice(0, max - 1) + '\u2026' : flat;
  }

  // The token's claims, read without verifying (the server verifies): only for the name and the
  // `courses` claim when the course list cannot be fetched.
  function decodeClaims(token) {
    try {
      var part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      var json = decodeURIComponent(Array.prototype.map.call(atob(part + '==='.slice((part.length + 3) % 4)),
        function (c) { return '%' + ('0' + c.charCodeAt(0).toString(16)).slice(-2); }).join(''));
      var claims = JSON.parse(json);
      return claims && typeof claims === 'object' ? claims : {};
    } catch (e) {
      return {};
    }
  }

  function readFragment() {
    var params = new URLSearchParams(location.hash.replace(/^#/, ''));
    var token = params.get('token');
    if (token) {
      params.delete('token');
      var rest = params.toString();
      // Out of the address bar, and so out of history, bookmarks and screenshots.
      history.replaceState(history.state, '', location.pathname + location.search + (rest ? '#' + rest : ''));
    }
    return token;
  }

  /* ---- Dashboard ------------------------------------------------------------------------------- */

  function Dashboard(root, token) {
    this.root = root;
    this.token = token;
    this.claims = decodeClaims(token);
    this.ready = false;
    this.welcomes = 0;
    // `ai_state` frames received so far, and how many there had been at the last `welcome`: the AI's
    // state also comes in snapshots, joins and transcripts read at some moment, and a frame that came
    // after that moment is the newer news (see `joined` and `loadTranscript`).
    this.aiFrames = 0;
    this.aiFramesAtWelcome = 0;
    this.courses = new Map();   // course id -> course
    this.sessions = new Map();  // student session id -> conversation
    this.convos = new Map();    // conversation id -> conversation
    this.pending = [];          // frames awaiting their answer, in the order sent; errors name theirs by ref
    this.open = null;
    this.dirty = new Set();
    this.ui = {
      whoami: $(root, '.st-whoami'),
      status: $(root, '.st-status'),
      statusText: $(root, '.se-status__text'),
      countdown: $(root, '.se-status__count'),
      reconnect: $(root, '.st-reconnect'),
      total: $(root, '.st-attention-total'),
      notices: $(root, '.st-notices'),
      sideState: $(root, '.st-side__state'),
      courses: $(root, '.st-courses'),
      watchForm: $(root, '.st-watch'),
      watchInput: $(root, '#st-watch-input'),
      empty: $(root, '.st-convo__hint'),
      pane: $(root, '.st-convo__open'),
      sub: $(root, '.st-convo__sub'),
      ai: $(root, '.st-ai'),
      title: $(root, '#st-convo-title'),
      back: $(root, '.st-back'),
      course: $(root, '.st-convo__course'),
      state: $(root, '.st-convo__state'),
      presence: $(root, '.st-convo__presence'),
      aiState: $(root, '.st-ai__state'),
      aiToggle: $(root, '.st-ai__toggle'),
      attention: $(root, '.st-attention'),
      attentionText: $(root, '.st-attention__text'),
      attentionClear: $(root, '.st-attention__clear'),
      log: $(root, '.st-log'),
      older: $(root, '.st-older'),
      loadError: $(root, '.st-load-error'),
      loadErrorText: $(root, '.st-load-error__text'),
      loadRetry: $(root, '.st-load-error__retry'),
      logEmpty: $(root, '.st-log__empty'),
      list: $(root, '.st-messages'),
      form: $(root, '.st-composer'),
      inputLabel: $(root, '.st-composer__label'),
      input: $(root, '#st-input'),
      announcer: $(root, '.st-announcer'),
      convo: $(root, '.st-convo'),
    };
    var scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    var self = this;
    this.pacer = new common.Pacer(function () { self.renderDirty(); });
    this.connection = new common.Socket(scheme + '//' + location.host + '/ws', {
      onOpen: function () { self.connection.send({ type: 'hello', token: self.token }); },
      onFrame: function (f) { self.onFrame(f); },
      onClose: function (code) { return self.onClose(code); },
      onState: function (state, until) { self.setStatus(state, until); },
    });
    // The course documents panel (teacher-docs.js), for the courses the viewer may manage.
    this.docs = ns.CourseDocuments ? new ns.CourseDocuments($(root, '.st-docs'), this) : null;
    this.docsCourse = null;
    this.bind();
  }

  Dashboard.prototype.start = function () {
    var name = typeof this.claims.name === 'string' ? this.claims.name : '';
    var role = this.claims.role === 'admin' ? 'administrator' : 'teacher';
    this.ui.whoami.textContent = name ? 'Signed in as ' + name + ' (' + role + ')' : '';
    if (this.claims.role && this.claims.role !== 'teacher' && this.claims.role !== 'admin') {
      this.signedOut('This dashboard is for teachers. Your sign-in is a ' + this.claims.role + '\u2019s.');
      return;
    }
    this.loadCourses();
    this.connection.start();
    var self = this;
    this.resnapshot = setInterval(function () { if (self.ready) self.watchAll(); }, RESNAPSHOT_MS);
  };

  Dashboard.prototype.bind = function () {
    var self = this;
    var ui = this.ui;
    ui.reconnect.addEventListener('click', function () { self.connection.reconnectNow(); });
    ui.back.addEventListener('click', function () { self.close(); });
    ui.aiToggle.addEventListener('click', function () { self.toggleAi(); });
    ui.attentionClear.addEventListener('click', function () { self.review(); });
    ui.older.addEventListener('click', function () { self.loadTranscript(self.open, true); });
    ui.loadRetry.addEventListener('click', function () { self.loadTranscript(self.open, false); });
    ui.form.addEventListener('submit', function (event) { event.preventDefault(); self.sendTeacherMessage(); });
    ui.input.addEventListener('keydown', function (event) {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
        event.preventDefault();
        self.sendTeacherMessage();
      }
    });
    ui.watchForm.addEventListener('submit', function (event) {
      event.preventDefault();
      var id = ui.watchInput.value.trim();
      if (!id) return;
      ui.watchInput.value = '';
      self.addCourse(id, id).section.querySelector('h3').focus();
    });
    this.root.addEventListener('keydown', function (event) {
      // Escape goes back to the list where the list and the conversation share the screen.
      if (event.key === 'Escape' && self.open && ui.back.offsetParent !== null && !event.defaultPrevented &&
          document.activeElement !== ui.input) {
        self.close();
      }
    });
  };

  /* -- header, notices, announcements ----------------------------------------------------------- */

  Dashboard.prototype.setStatus = function (state, until) {
    if (this.isSignedOut) state = 'signed-out';
    var labels = { connecting: 'Connecting', online: 'Online', reconnecting: 'Reconnecting', offline: 'Offline',
      'signed-out': 'Signed out' };
    this.ui.status.setAttribute('data-state', state);
    setText(this.ui.statusText, labels[state] || state);
    var left = until ? Math.max(0, Math.ceil((until - Date.now()) / 1000)) : 0;
    setText(this.ui.countdown, state === 'reconnecting' ? ' in ' + left + ' s' : '');
    this.ui.reconnect.hidden = !(state === 'reconnecting' || state === 'offline');
    this.renderControls();
  };

  Dashboard.prototype.announce = function (text) {
    var announcer = this.ui.announcer;
    var queue = (this.announceQueue = this.announceQueue || []);
    queue.push(text);
    if (this.announceTimer) return;
    var self = this;
    // Several events in one burst become one announcement; a fresh node is read even if repeated.
    this.announceTimer = setTimeout(function () {
      self.announceTimer = null;
      announcer.textContent = '';
      var all = queue.splice(0, queue.length).join(' ');
      setTimeout(function () { announcer.textContent = all; }, 50);
    }, 150);
  };

  Dashboard.prototype.notice = function (key, text, tone, actions) {
    this.clearNotice(key);
    var self = this;
    var box = h('div', { className: 'se-notice se-notice--' + (tone || 'info'), 'data-code': key },
      [h('span', { className: 'se-notice__msg', text: text })]);
    (actions || []).forEach(function (action) {
      var button = h('button', { type: 'button', className: 'se-link-button', text: action.label });
      button.addEventListener('click', function () { self.clearNotice(key); action.run(); });
      box.appendChild(button);
    });
    var dismiss = h('button', { type: 'button', className: 'se-icon-button', 'aria-label': 'Dismiss notice' }, ['\u00d7']);
    dismiss.addEventListener('click', function () { self.clearNotice(key); });
    box.appendChild(dismiss);
    this.ui.notices.appendChild(box);
  };

  Dashboard.prototype.clearNotice = function (key) {
    var old = this.ui.notices.querySelector('[data-code="' + key + '"]');
    if (old) old.parentNode.removeChild(old);
  };

  Dashboard.prototype.signedOut = function (text) {
    this.isSignedOut = true;
    this.ready = false;
    this.connection.stop();
    clearInterval(this.resnapshot);
    this.setStatus('signed-out');
    this.notice('signed-out', text, 'error');
  };

  /* -- courses --------------------------------------------------------------------------------- */

  Dashboard.prototype.loadCourses = function () {
    var self = this;
    var claimed = Array.isArray(this.claims.courses)
      ? this.claims.courses.filter(function (c) { return typeof c === 'string' && c; }) : [];
    this.fetchJson('/api/teacher/courses').then(function (body) {
      var list = body && Array.isArray(body.courses) ? body.courses : [];
      list.forEach(function (c) {
        if (c && typeof c.id === 'string') self.addCourse(c.id, typeof c.title === 'string' && c.title ? c.title : c.id);
      });
      self.coursesLoaded(list.length ? null : 'You have no courses yet.');
    }, function (error) {
      claimed.forEach(function (id) { self.addCourse(id, id); });
      if (claimed.length) {
        self.notice('courses', 'Course names could not be loaded (' + error.message + '); showing course ids from your sign-in.', 'warn');
        self.coursesLoaded(null);
      } else {
        self.coursesLoaded('Your courses could not be loaded (' + error.message + ').', true);
      }
    });
  };

  Dashboard.prototype.coursesLoaded = function (problem, retry) {
    var state = this.ui.sideState;
    state.textContent = '';
    state.hidden = !problem;
    state.classList.toggle('st-side__state--error', !!retry);
    if (problem) {
      state.appendChild(document.createTextNode(problem + ' '));
      if (retry) {
        var self = this;
        var again = h('button', { type: 'button', className: 'se-link-button', text: 'Try again' });
        again.addEventListener('click', function () { state.textContent = 'Loading your courses\u2026'; self.loadCourses(); });
        state.appendChild(again);
      }
    }
    // Administrators may watch any course of their school; so may anyone whose list failed to load.
    this.ui.watchForm.hidden = !(this.claims.role === 'admin' || (problem && retry));
  };

  Dashboard.prototype.addCourse = function (id, title) {
    var existing = this.courses.get(id);
    if (existing) {
      if (title && title !== id) {
        existing.title = title;
        setText(existing.titleEl, title);
        if (existing.docsButton) existing.docsButton.setAttribute('aria-label', 'Documents of ' + title);
      }
      return existing;
    }
    var headingId = 'st-course-' + (this.courses.size + 1);
    var course = {
      id: id, title: title || id, convos: new Set(), state: 'watching', error: null,
      titleEl: h('span', { className: 'st-course__title', text: title || id }),
      countEl: h('span', { className: 'st-course__count', text: '' }),
      flagEl: h('span', { className: 'st-badge st-badge--attention', hidden: true }),
      stateEl: h('p', { className: 'st-course__state', text: 'Connecting\u2026' }),
      list: h('ul', { className: 'st-students', 'aria-labelledby': headingId }),
    };
    var self = this;
    if (this.docs && this.mayManage(id)) {
      course.docsButton = h('button', { type: 'button', className: 'se-link-button st-course__docs', text: 'Documents',
        'aria-label': 'Documents of ' + course.title, 'aria-current': 'false' });
      course.docsButton.addEventListener('click', function () { self.showDocuments(course); });
    }
    course.section = h('section', { className: 'st-course', 'data-course-id': id }, [
      h('h3', { id: headingId, className: 'st-course__head', tabindex: '-1' },
        [course.titleEl, h('span', { className: 'se-sr-only', text: ', ' }), course.countEl, course.flagEl]),
      course.docsButton,
      course.stateEl,
      course.list,
    ]);
    this.courses.set(id, course);
    this.ui.courses.appendChild(course.section);
    this.renderCourse(course);
    if (this.ready) this.watch(course);
    return course;
  };

  // Whether the sign-in may manage a course's documents, as the server decides: teachers of the course
  // (in their token's courses) and administrators. The server still checks; a refusal is shown as such.
  Dashboard.prototype.mayManage = function (id) {
    var courses = Array.isArray(this.claims.courses) ? this.claims.courses : [];
    return this.claims.role === 'admin' || (this.claims.role === 'teacher' && courses.indexOf(id) >= 0);
  };

  // The documents take the conversation's place (and, on narrow screens, the list's).
  Dashboard.prototype.showDocuments = function (course) {
    if (this.open) this.close(true);
    this.markDocuments(course);
    this.ui.convo.hidden = true;
    this.root.setAttribute('data-view', 'documents');
    this.docs.open(course);
  };

  // Back to the list, the focus on the course's Documents button.
  Dashboard.prototype.hideDocuments = function () {
    var course = this.leaveDocuments();
    if (!course) return;
    this.root.setAttribute('data-view', 'list');
    course.docsButton.focus();
  };

  // The course whose documents were shown (null if none), now no longer.
  Dashboard.prototype.leaveDocuments = function () {
    var course = this.docsCourse;
    if (course) {
      this.markDocuments(null);
      this.docs.hide();
      this.ui.convo.hidden = false;
    }
    return course;
  };

  Dashboard.prototype.markDocuments = function (course) {
    if (this.docsCourse) this.docsCourse.docsButton.setAttribute('aria-current', 'false');
    this.docsCourse = course;
    if (course) course.docsButton.setAttribute('aria-current', 'true');
  };

  Dashboard.prototype.watchAll = function () {
    var self = this;
    this.courses.forEach(function (course) { self.watch(course); });
  };

  Dashboard.prototype.watch = function (course) {
    if (this.connection.send({ type: 'watch', course_id: course.id })) {
      this.pending.push({ kind: 'watch', ref: course.id, course: course, aiFrames: this.aiFrames });
    }
  };

  Dashboard.prototype.onSnapshot = function (f) {
    var course = this.courses.get(f.course_id);
    if (!course) return;
    var op = this.settle(function (o) { return o.kind === 'watch' && o.course === course; });
    var asked = op ? op.aiFrames : this.aiFramesAtWelcome;
    course.state = 'live';
    course.error = null;
    var seen = new Set();
    var self = this;
    (Array.isArray(f.students) ? f.students : []).forEach(function (student) {
      if (student && typeof student.session_id === 'string') {
        seen.add(student.session_id);
        self.joined(course, student, asked);
      }
    });
    // The snapshot is the truth about who is here: sessions it does not list have gone.
    this.sessions.forEach(function (convo, sessionId) {
      if (convo.course === course && !seen.has(sessionId)) self.left(sessionId);
    });
    this.renderCourse(course);
  };

  Dashboard.prototype.renderCourse = function (course) {
    var online = 0;
    var attention = 0;
    course.convos.forEach(function (convo) {
      if (convo.sessions.size) online += 1;
      if (convo.attention.length) attention += 1;
    });
    setText(course.countEl, online === 1 ? '1 online' : online + ' online');
    course.flagEl.hidden = attention === 0;
    setText(course.flagEl, attention === 1 ? '1 needs attention' : attention + ' need attention');
    var state = course.error ? course.error
      : course.state !== 'live' ? 'Connecting\u2026'
      : course.list.firstChild ? '' : 'No students online right now.';
    setText(course.stateEl, state);
    course.stateEl.hidden = !state;
    course.stateEl.classList.toggle('st-course__state--error', !!course.error);
    this.renderTotal();
  };

  Dashboard.prototype.renderTotal = function () {
    var total = 0;
    this.convos.forEach(function (convo) { if (convo.attention.length) total += 1; });
    this.ui.total.hidden = total === 0;
    setText(this.ui.total, total === 1 ? '1 conversation needs attention' : total + ' conversations need attention');
  };

  /* -- students and their conversations -------------------------------------------------------- */

  Dashboard.prototype.convo = function (id, course) {
    var convo = this.convos.get(id);
    if (convo) return convo;
    convo = {
      id: id, course: course, name: '', userId: '', sessions: new Set(), state: 'idle', paused: null,
      aiPending: null, attention: [], messages: new Map(), teacherPending: new Map(), row: null,
      oldestId: null, hasMore: false, loading: false, loaded: false, aiFrameAt: 0,
    };
    this.convos.set(id, convo);
    course.convos.add(convo);
    return convo;
  };

  Dashboard.prototype.displayName = function (convo) {
    return convo.name || (convo.userId ? 'Student ' + convo.userId : 'A student');
  };

  // `asked`: how many `ai_state` frames had arrived when this news was asked for; its `ai_paused` is
  // older than a frame for the conversation that arrived since.
  Dashboard.prototype.joined = function (course, student, asked) {
    if (typeof student.conversation_id !== 'string') return;
    var convo = this.convo(student.conversation_id, course);
    if (typeof student.name === 'string' && student.name) convo.name = student.name;
    if (typeof student.user_id === 'string') convo.userId = student.user_id;
    if (typeof student.ai_paused === 'boolean' && convo.aiPending === null && convo.aiFrameAt <= asked) {
      convo.paused = student.ai_paused;
    }
    convo.sessions.add(student.session_id);
    this.sessions.set(student.session_id, convo);
    this.renderRow(convo);
    if (convo === this.open) this.renderPane();
  };

  Dashboard.prototype.left = function (sessionId) {
    var convo = this.sessions.get(sessionId);
    if (!convo) return;
    this.sessions.delete(sessionId);
    convo.sessions.delete(sessionId);
    this.renderRow(convo);
    if (convo === this.open) this.renderPane();
  };

  // A row per conversation: shown while the student is online, while it needs attention, and while open.
  Dashboard.prototype.renderRow = function (convo) {
    var course = convo.course;
    var visible = convo.sessions.size > 0 || convo.attention.length > 0 || convo === this.open;
    if (!visible) {
      if (convo.row && convo.row.li.parentNode) convo.row.li.parentNode.removeChild(convo.row.li);
      convo.row = null;
      this.renderCourse(course);
      return;
    }
    if (!convo.row) {
      var row = {
        name: h('span', { className: 'st-student__name' }),
        chip: h('span', { className: 'st-chip' }),
        paused: h('span', { className: 'st-chip st-chip--paused', hidden: true, text: 'AI paused' }),
        gone: h('span', { className: 'st-chip st-chip--gone', hidden: true, text: 'Left' }),
        flag: h('span', { className: 'st-badge st-badge--attention', hidden: true }),
      };
      var sep = function () { return h('span', { className: 'se-sr-only', text: ', ' }); };
      row.button = h('button', { type: 'button', className: 'st-student', 'data-conversation-id': convo.id },
        [row.name, sep(), row.chip, sep(), row.paused, row.gone, row.flag]);
      row.li = h('li', { className: 'st-row' }, [row.button]);
      var self = this;
      row.button.addEventListener('click', function () { self.openConvo(convo); });
      convo.row = row;
      this.insertRow(course, convo);
    }
    var r = convo.row;
    var name = this.displayName(convo);
    if (r.name.textContent !== name) {
      setText(r.name, name);
      this.insertRow(course, convo); // names arrive with presence: keep the list alphabetical
    }
    r.chip.setAttribute('data-state', convo.state);
    setText(r.chip, STATE_LABEL[convo.state] || STATE_LABEL.idle);
    r.paused.hidden = convo.paused !== true;
    r.gone.hidden = convo.sessions.size > 0;
    r.flag.hidden = convo.attention.length === 0;
    var kinds = convo.attention.map(function (a) { return a.kind; });
    setText(r.flag, kinds.indexOf('safety_block') >= 0 ? 'Flagged' : 'Needs attention');
    r.flag.setAttribute('data-kind', kinds.indexOf('safety_block') >= 0 ? 'flag' : 'failed');
    r.button.setAttribute('aria-current', convo === this.open ? 'true' : 'false');
    r.li.setAttribute('data-attention', convo.attention.length ? 'true' : 'false');
    this.renderCourse(course);
  };

  // Rows never move once placed unless their name changes, so keyboard focus is never yanked.
  Dashboard.prototype.insertRow = function (course, convo) {
    var li = convo.row.li;
    var name = this.displayName(convo).toLocaleLowerCase();
    var before = null;
    for (var node = course.list.firstChild; node; node = node.nextSibling) {
      if (node === li) continue;
      var other = node.querySelector('.st-student__name').textContent.toLocaleLowerCase();
      if (other.localeCompare(name) > 0) { before = node; break; }
    }
    if (li.nextSibling === before && li.parentNode === course.list) return;
    var focused = li.contains(document.activeElement) ? document.activeElement : null;
    course.list.insertBefore(li, before);
    if (focused) focused.focus();
  };

  /* -- the socket's frames --------------------------------------------------------------------- */

  Dashboard.prototype.onClose = function (code) {
    this.ready = false;
    this.pending.forEach(function (op) { if (op.kind === 'ai') op.convo.aiPending = null; });
    this.pending = [];
    this.courses.forEach(function (course) { if (course.state === 'live') course.state = 'watching'; });
    if (this.open) this.renderPane();
    if (code === 4401) {
      this.signedOut('Your sign-in has expired. Open the dashboard again from your school\u2019s site.');
      return 'stop';
    }
    if (code === 4403 || code === 1008) {
      this.signedOut('This sign-in may not use the dashboard.');
      return 'stop';
    }
    if (code === 1012) return 800 + Math.random() * 1500; // the server is restarting: come back soon
    return undefined;
  };

  Dashboard.prototype.onFrame = function (f) {
    switch (f.type) {
      case 'welcome': this.onWelcome(f); break;
      case 'snapshot': this.onSnapshot(f); break;
      case 'event': this.onEvent(f); break;
      case 'resync': this.onResync(f); break;
      case 'error': this.onError(f); break;
      case 'reconnect':
        var after = typeof f.after_ms === 'number' && f.after_ms >= 0 ? f.after_ms : 1000;
        this.connection.detach(undefined, after + Math.random() * Math.min(1000, after * 0.2 + 100));
        break;
      case 'teacher_message': // a resent intervention comes back to this socket only
        var convo = this.convos.get(f.conversation_id);
        if (convo) this.onConvoFrame(convo, f);
        break;
      default: break; // pong, and the teacher's own (empty) conversation
    }
  };

  Dashboard.prototype.onWelcome = function () {
    var again = this.welcomes > 0;
    this.welcomes += 1;
    this.ready = true;
    this.aiFramesAtWelcome = this.aiFrames;  // frames may have been missed while away
    this.connection.welcome();
    this.clearNotice('signed-out');
    this.clearNotice('connect');
    if (again) {
      // Frames were missed while away: what was streaming may have ended. The open transcript is
      // reloaded; the others show their state again as frames arrive.
      this.convos.forEach(function (convo) {
        if (convo.state === 'waiting' || convo.state === 'streaming') convo.state = 'idle';
        convo.loaded = false;
      });
    }
    this.watchAll();
    var self = this;
    this.convos.forEach(function (convo) {
      convo.teacherPending.forEach(function (msg) { if (msg.status !== 'rejected') self.intervene(convo, msg); });
      self.renderRow(convo);
    });
    if (this.open && again) this.loadTranscript(this.open, false);
    this.renderControls();
  };

  // The server may have missed this course's events (its connection to the other servers dropped):
  // read the course again, as after a reconnect. The snapshot replaces who is online; the open
  // transcript is merged by message id, so nothing shows twice.
  Dashboard.prototype.onResync = function (f) {
    var course = this.courses.get(f.course_id);
    if (!course) return;
    var self = this;
    this.convos.forEach(function (convo) {
      if (convo.course !== course) return;
      if (convo.state === 'waiting' || convo.state === 'streaming') convo.state = 'idle';
      convo.loaded = false;
      self.renderRow(convo);
    });
    // Every dashboard watching the course on that server is told at once: spread the reads over a moment.
    setTimeout(function () {
      if (self.courses.get(f.course_id) !== course) return;
      self.watch(course);
      if (self.open && self.open.course === course) self.loadTranscript(self.open, false);
    }, Math.random() * RESYNC_SPREAD_MS);
  };

  Dashboard.prototype.onEvent = function (f) {
    var course = this.courses.get(f.course_id);
    if (!course) return;
    if (f.kind === 'joined' && f.student && typeof f.student.session_id === 'string') {
      this.joined(course, f.student, this.aiFramesAtWelcome);
    } else if (f.kind === 'left' && f.student && typeof f.student.session_id === 'string') {
      this.left(f.student.session_id);
    } else if (f.kind === 'frame' && f.frame && typeof f.frame === 'object') {
      var id = f.conversation_id || f.frame.conversation_id;
      if (typeof id === 'string' && id) this.onConvoFrame(this.convo(id, course), f.frame);
    }
  };

  // Take the oldest pending request that `match`es off the queue.
  Dashboard.prototype.settle = function (match) {
    for (var i = 0; i < this.pending.length; i++) {
      if (match(this.pending[i])) return this.pending.splice(i, 1)[0];
    }
    return null;
  };

  Dashboard.prototype.onError = function (f) {
    var ref = typeof f.ref === 'string' ? f.ref : null;
    // An error about a teacher's frame has `ref` (the course of a watch, the client id of an
    // intervention, the conversation of an ai switch): it belongs to the oldest request with that ref.
    // Only one without a known ref (a refused frame, a backing service down) is put on the oldest request.
    if (!this.ready && !ref && (f.code === 'internal' || f.code === 'busy')) {
      // The hello itself failed: `busy` (the socket is closed next, and reconnects after its backoff) or
      // a dependency (the database restarting; the socket still waits for a hello, said again after
      // retry_after, jittered).
      if (f.code === 'internal') {
        var self = this;
        this.connection.helloAgain(typeof f.retry_after === 'number' ? f.retry_after : 1, function () {
          self.connection.send({ type: 'hello', token: self.token });
        });
      }
      this.notice('connect', f.code === 'busy' ? 'The server is busy. Connecting again in a moment\u2026'
        : 'The server could not sign you in yet. Trying again\u2026', 'warn');
      return;
    }
    var op = (ref && this.settle(function (o) { return o.ref === ref; })) || this.pending.shift() || null;
    var reasons = {
      forbidden: 'you may not watch it', not_found: 'it does not exist', too_large: 'the message is too long',
      rate_limited: 'too many requests; try again in a moment', internal: 'something went wrong on the server',
      bad_request: 'the request was refused', ai_unavailable: 'the server is busy; try again',
    };
    var reason = reasons[f.code] || (typeof f.message === 'string' ? f.message : 'error');
    if (f.code === 'unauthorized') {
      this.signedOut('Your sign-in has expired. Open the dashboard again from your school\u2019s site.');
      return;
    }
    if (!op) {
      this.notice('error', 'The server reported a problem: ' + reason + '.', 'error');
      return;
    }
    if (op.kind === 'watch') {
      op.course.error = 'Cannot watch this course: ' + reason + '.';
      this.renderCourse(op.course);
      this.announce('Cannot watch ' + op.course.title + ': ' + reason + '.');
    } else if (op.kind === 'intervene') {
      op.msg.status = 'rejected';
      op.msg.reason = reason;
      this.renderMessage(op.convo, op.msg);
      this.notice('intervene', 'Your message to ' + this.displayName(op.convo) + ' was not sent: ' + reason + '.', 'error');
    } else if (op.kind === 'ai') {
      op.convo.aiPending = null;
      this.renderPane();
      this.notice('ai', 'The AI tutor could not be ' + (op.paused ? 'paused' : 'resumed') + ' for ' +
        this.displayName(op.convo) + ': ' + reason + '.', 'error');
    }
  };

  /* -- one conversation's frames --------------------------------------------------------------- */

  Dashboard.prototype.onConvoFrame = function (convo, f) {
    var name = this.displayName(convo);
    var isOpen = convo === this.open;
    switch (f.type) {
      case 'ack': {
        if (typeof f.message_id !== 'number') return;
        var question = this.message(convo, f.message_id, 'user');
        if (typeof f.text === 'string' && !question.text) { question.text = f.text; question.len = cpLength(f.text); }
        this.touch(convo, question);
        if (typeof f.reply_id === 'number') {
          var reply = this.message(convo, f.reply_id, 'assistant');
          if (!FINAL[reply.status]) reply.status = reply.len ? 'streaming' : 'waiting';
          this.touch(convo, reply);
          convo.state = 'waiting';
        } else {
          // No answer is coming: the AI is paused for this student and the question waits for the teacher.
          convo.paused = true;
          convo.state = 'unanswered';
          this.announce(name + ' asked a question while the AI tutor is paused: ' + plainText(question.text, 140));
        }
        if (isOpen && typeof f.reply_id === 'number') this.announce(name + ' asked: ' + plainText(question.text, 140));
        break;
      }
      case 'token': {
        if (typeof f.reply_id !== 'number' || typeof f.text !== 'string') return;
        var item = this.message(convo, f.reply_id, 'assistant');
        if (FINAL[item.status]) return;
        var offset = typeof f.offset === 'number' ? f.offset : item.len;
        if (item.len === 0 && !item.text && offset > 0 && !item.pieces.size) {
          // Watching began mid-answer: show from here on; the whole text is fetched when it ends.
          item.partial = true;
          item.len = offset;
        }
        addPiece(item, offset, f.text);
        item.status = 'streaming';
        convo.state = 'streaming';
        this.touch(convo, item);
        break;
      }
      case 'done': {
        if (typeof f.reply_id !== 'number') return;
        var done = this.message(convo, f.reply_id, 'assistant');
        done.status = FINAL[f.status] ? f.status : 'complete';
        outcome(done, f);
        if (done.partial || done.gap || (typeof f.length === 'number' && f.length !== done.len)) done.needsText = true;
        convo.state = this.activeState(convo);
        if (done.status === 'failed' || done.status === 'interrupted') {
          this.flag(convo, { kind: done.status, messageId: done.id });
        }
        this.touch(convo, done);
        if (isOpen && done.needsText) this.repair(convo, done);
        if (isOpen && done.status === 'complete' && done.blocked) {
          this.announce('The tutor\u2019s answer to ' + name + ' was stopped by the safety filter.');
        } else if (isOpen && done.status === 'complete' && !done.needsText) {
          this.announce('The tutor answered ' + name + ': ' + plainText(done.text, 200));
        }
        break;
      }
      case 'teacher_message': {
        if (typeof f.message_id !== 'number' || typeof f.text !== 'string') return;
        var mine = typeof f.id === 'string' ? convo.teacherPending.get(f.id) : null;
        if (mine) {
          convo.teacherPending.delete(f.id);
          this.settle(function (o) { return o.kind === 'intervene' && o.ref === f.id; });
          if (convo.messages.has(f.message_id)) { this.removeMessage(convo, mine); break; }
          mine.id = f.message_id;
          mine.status = 'complete';
          convo.messages.set(mine.id, mine);
          if (mine.li && mine.li.parentNode) {
            // Confirmed: from the end of the list to its place by id.
            mine.li.removeAttribute('data-pending');
            mine.li.parentNode.removeChild(mine.li);
            this.placeMessage(mine);
          }
          this.touch(convo, mine);
          this.announce('Message sent to ' + name + '.');
        } else {
          var note = this.message(convo, f.message_id, 'teacher');
          note.text = f.text;
          note.len = cpLength(f.text);
          note.status = 'complete';
          if (typeof f.name === 'string') note.name = f.name;
          this.touch(convo, note);
        }
        if (convo.state === 'unanswered') convo.state = 'idle';
        break;
      }
      case 'ai_state': {
        if (typeof f.paused !== 'boolean') return;
        this.settle(function (o) { return o.kind === 'ai' && o.convo === convo; });
        convo.paused = f.paused;
        convo.aiPending = null;
        this.aiFrames += 1;
        convo.aiFrameAt = this.aiFrames;
        if (!f.paused && convo.state === 'unanswered') convo.state = 'idle';
        if (isOpen) this.announce('AI tutor ' + (f.paused ? 'paused' : 'resumed') + ' for ' + name + '.');
        break;
      }
      case 'flag': {
        var flagged = typeof f.message_id === 'number' ? this.message(convo, f.message_id, 'user') : null;
        if (flagged) { flagged.flag = f.kind || 'safety_block'; this.touch(convo, flagged); }
        this.flag(convo, { kind: typeof f.kind === 'string' ? f.kind : 'safety_block', messageId: f.message_id,
          replyId: f.reply_id });
        break;
      }
      default:
        return;
    }
    this.renderRow(convo);
    if (isOpen) this.renderPane();
    this.trim(convo);
  };

  // After an answer ends another may be queued (a student can ask twice in a row).
  Dashboard.prototype.activeState = function (convo) {
    var state = 'idle';
    convo.messages.forEach(function (m) {
      if (m.kind !== 'assistant' || FINAL[m.status]) return;
      if (m.status === 'streaming') state = 'streaming';
      else if (state === 'idle') state = 'waiting';
    });
    return state;
  };

  Dashboard.prototype.flag = function (convo, entry) {
    entry.at = new Date();
    var seen = convo.attention.some(function (a) { return a.kind === entry.kind && a.messageId === entry.messageId; });
    if (seen) return;
    convo.attention.push(entry);
    var where = convo.course.title;
    var who = this.displayName(convo);
    if (entry.kind === 'safety_block') {
      this.announce('Flag in ' + where + ': ' + who + '\u2019s question was blocked by the safety filter.');
    } else {
      this.announce('Attention in ' + where + ': ' + who + '\u2019s answer ' +
        (entry.kind === 'failed' ? 'could not be completed.' : 'was interrupted.'));
    }
  };

  Dashboard.prototype.review = function () {
    var convo = this.open;
    if (!convo) return;
    convo.attention = [];
    this.renderRow(convo);
    this.renderPane();
    this.ui.input.focus();
    this.announce('Marked as reviewed.');
  };

  // Old messages of conversations nobody is looking at are dropped; opening one reloads them.
  Dashboard.prototype.trim = function (convo) {
    if (convo === this.open || convo.messages.size <= KEEP_MESSAGES) return;
    var ids = Array.from(convo.messages.keys()).sort(function (a, b) { return a - b; });
    ids.slice(0, ids.length - KEEP_MESSAGES).forEach(function (id) { convo.messages.delete(id); });
    convo.loaded = false;
  };

  /* -- messages -------------------------------------------------------------------------------- */

  Dashboard.prototype.message = function (convo, id, kind) {
    var msg = convo.messages.get(id);
    if (!msg) {
      msg = newMessage(kind, id, '', kind === 'assistant' ? 'waiting' : 'complete', new Date().toISOString());
      convo.messages.set(id, msg);
    }
    return msg;
  };

  function newMessage(kind, id, text, status, createdAt) {
    return { kind: kind, id: id, text: text, len: cpLength(text), pieces: new Map(), gap: false, partial: false,
      status: status, createdAt: createdAt, name: '', flag: null, li: null, needsText: false, blocked: false };
  }

  // Put a piece of an answer at its code-point offset: drop what is already there, hold what comes
  // after a gap until the gap is filled.
  function addPiece(item, offset, text) {
    var length = cpLength(text);
    if (offset + length <= item.len) return;
    if (offset > item.len) {
      if (!item.pieces.has(offset) || cpLength(item.pieces.get(offset)) < length) item.pieces.set(offset, text);
      item.gap = true;
      return;
    }
    item.text += offset === item.len ? text : cpSlice(text, item.len - offset);
    item.len = offset + length;
    var moved = true;
    while (moved) {
      moved = false;
      item.pieces.forEach(function (piece, at) {
        if (at > item.len) return;
        item.pieces.delete(at);
        if (at + cpLength(piece) > item.len) {
          item.text += cpSlice(piece, item.len - at);
          item.len = at + cpLength(piece);
        }
        moved = true;
      });
    }
    item.gap = item.pieces.size > 0;
  }

  // Fold a page of committed messages into what the live frames built: committed final rows win;
  // an answer still streaming keeps the longer live text (the database has none until it ends).
  Dashboard.prototype.merge = function (convo, rows) {
    var self = this;
    rows.forEach(function (m) {
      if (!m || typeof m.id !== 'number') return;
      var kind = m.role === 'assistant' || m.role === 'teacher' ? m.role : 'user';
      var text = typeof m.text === 'string' ? m.text : '';
      var status = typeof m.status === 'string' ? m.status : 'complete';
      var msg = convo.messages.get(m.id);
      if (!msg) {
        msg = newMessage(kind, m.id, text, status, m.created_at);
        outcome(msg, m);
        if (kind === 'assistant' && !FINAL[status]) msg.status = text ? 'streaming' : 'waiting';
        convo.messages.set(m.id, msg);
      } else if (FINAL[status] || kind !== 'assistant') {
        msg.text = text;
        msg.len = cpLength(text);
        msg.status = kind === 'assistant' ? status : 'complete';
        outcome(msg, m);
        msg.gap = msg.partial = msg.needsText = false;
        msg.pieces = new Map();
      } else if (cpLength(text) > msg.len) {
        msg.text = text;
        msg.len = cpLength(text);
        msg.partial = false;
      }
      if (m.created_at) msg.createdAt = m.created_at;
      if (convo.oldestId === null || m.id < convo.oldestId) convo.oldestId = m.id;
      if (convo === self.open) self.renderMessage(convo, msg);
    });
  };

  Dashboard.prototype.touch = function (convo, msg) {
    if (convo !== this.open) return;
    this.dirty.add(msg);
    this.pacer.request();
  };

  Dashboard.prototype.flush = function () {
    this.pacer.flush();
  };

  Dashboard.prototype.renderDirty = function () {
    var convo = this.open;
    var log = this.ui.log;
    var stick = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
    var self = this;
    this.dirty.forEach(function (msg) { if (convo) self.renderMessage(convo, msg); });
    this.dirty.clear();
    if (stick) log.scrollTop = log.scrollHeight;
    this.ui.logEmpty.hidden = this.ui.list.firstChild !== null || !convo || !convo.loaded;
  };

  Dashboard.prototype.renderMessage = function (convo, msg) {
    if (!msg.li) {
      var label = msg.kind === 'user' ? this.displayName(convo) : msg.kind === 'assistant' ? 'Tutor' : 'Teacher';
      msg.body = h('div', { className: 'se-bubble__body' });
      msg.markdown = null;
      msg.extras = [];
      msg.statusEl = h('span', { className: 'se-meta__status' });
      msg.flagEl = h('span', { className: 'st-badge st-badge--attention', hidden: true });
      msg.actions = h('span', { className: 'se-meta__actions' });
      msg.badge = msg.kind === 'teacher' ? h('span', { className: 'se-badge' }) : null;
      msg.li = h('li', { className: 'se-msg se-msg--' + msg.kind }, [
        h('div', { className: 'se-bubble' }, [
          msg.badge || h('span', { className: 'se-sr-only', text: label + ':' }),
          msg.body,
        ]),
        h('div', { className: 'se-meta' }, [
          msg.kind === 'teacher' ? null : h('span', { className: 'se-meta__who', 'aria-hidden': 'true', text: label }),
          msg.createdAt ? h('time', { datetime: msg.createdAt, text: formatTime(msg.createdAt) }) : null,
          msg.statusEl,
          msg.flagEl,
          msg.actions,
        ]),
      ]);
      this.placeMessage(msg);
    }
    if (msg.badge) setText(msg.badge, msg.name ? 'Teacher \u00b7 ' + msg.name : 'Teacher');
    msg.li.setAttribute('data-status', msg.status);
    if (msg.id != null) msg.li.setAttribute('data-id', String(msg.id));
    var body = msg.body;
    if (msg.kind === 'user') {
      setText(body, msg.text);
    } else {
      // A streamed answer grows at its end: only the text after the blocks already built is parsed again
      // (with a score of students' answers streaming, re-parsing each whole answer every frame adds up).
      msg.extras.forEach(function (node) { if (node.parentNode) node.parentNode.removeChild(node); });
      msg.extras = [];
      if (!msg.markdown) {
        msg.markdown = ns.MarkdownStream ? new ns.MarkdownStream(body)
          : { render: function (text) { body.textContent = text; } };
      }
      msg.markdown.render(msg.text || '');
      if (msg.partial && msg.text) {
        msg.extras.push(body.insertBefore(h('span', { className: 'st-partial', text: '\u2026 ' }), body.firstChild));
      }
      var active = msg.kind === 'assistant' && !FINAL[msg.status];
      msg.li.setAttribute('aria-busy', active ? 'true' : 'false');
      if (active) {
        var typing = msg.text
          ? h('span', { className: 'se-caret', 'aria-hidden': 'true' })
          : h('span', { className: 'se-typing', 'aria-hidden': 'true' }, [h('span'), h('span'), h('span')]);
        var last = body.lastElementChild;
        msg.extras.push((last && /^(P|LI)$/.test(last.nodeName) ? last : body).appendChild(typing));
      }
    }
    var status = STATUS_TEXT[msg.status] || '';
    if (msg.status === 'rejected' && msg.reason) status = 'Not sent: ' + msg.reason;
    if (msg.partial && !FINAL[msg.status]) status = 'Streaming (watching began mid-answer)';
    if (msg.status === 'complete' && msg.truncated) status = 'Cut short: the answer reached its length limit';
    if (msg.status === 'complete' && msg.blocked) status = 'Stopped by the safety filter';
    if (msg.status === 'failed' && FAILED_FOR_GOOD[msg.failure]) status = FAILED_FOR_GOOD[msg.failure];
    if (msg.needsText && FINAL[msg.status]) status = 'Loading the full answer\u2026';
    setText(msg.statusEl, status);
    msg.flagEl.hidden = !msg.flag;
    if (msg.flag) setText(msg.flagEl, ATTENTION_LABEL[msg.flag] || 'Flagged');
    msg.li.classList.toggle('st-msg--flagged', !!msg.flag);
    msg.li.classList.toggle('st-msg--blocked', msg.status === 'complete' && msg.blocked);
    msg.actions.textContent = '';
    if (msg.status === 'rejected') {
      var self = this;
      var again = h('button', { type: 'button', className: 'se-link-button', text: 'Try again',
        'aria-label': 'Send this message again' });
      again.addEventListener('click', function () { self.intervene(convo, msg); });
      msg.actions.appendChild(again);
    }
  };

  // Keep the transcript in id order; messages the server has not confirmed yet stay at the end.
  Dashboard.prototype.placeMessage = function (msg) {
    var list = this.ui.list;
    if (msg.id == null) {
      msg.li.setAttribute('data-pending', 'true');
      list.appendChild(msg.li);
      return;
    }
    var node = list.lastElementChild;
    while (node && (node.hasAttribute('data-pending') || Number(node.getAttribute('data-id')) > msg.id)) {
      node = node.previousElementSibling;
    }
    list.insertBefore(msg.li, node ? node.nextSibling : list.firstChild);
  };

  Dashboard.prototype.removeMessage = function (convo, msg) {
    if (msg.li && msg.li.parentNode) msg.li.parentNode.removeChild(msg.li);
    if (msg.id != null && convo.messages.get(msg.id) === msg) convo.messages.delete(msg.id);
  };

  /* -- the open conversation ------------------------------------------------------------------- */

  Dashboard.prototype.openConvo = function (convo) {
    this.leaveDocuments();
    var previous = this.open;
    if (previous && previous !== convo) {
      previous.messages.forEach(function (m) { m.li = null; });
      previous.teacherPending.forEach(function (m) { m.li = null; });
    }
    this.open = convo;
    this.dirty.clear();
    if (previous && previous !== convo) this.renderRow(previous);
    this.ui.list.textContent = '';
    this.ui.input.value = '';
    this.ui.loadError.hidden = true;
    var self = this;
    Array.from(convo.messages.values()).sort(function (a, b) { return a.id - b.id; })
      .forEach(function (msg) { msg.li = null; self.renderMessage(convo, msg); });
    convo.teacherPending.forEach(function (msg) { msg.li = null; self.renderMessage(convo, msg); });
    this.root.setAttribute('data-view', 'conversation');
    this.ui.empty.hidden = true;
    this.ui.pane.hidden = this.ui.sub.hidden = this.ui.ai.hidden = false;
    this.renderRow(convo);
    this.renderPane();
    this.ui.log.scrollTop = this.ui.log.scrollHeight;
    this.ui.title.focus();
    convo.loaded = false;
    convo.oldestId = null;
    this.loadTranscript(convo, false);
  };

  // `quiet`: the documents take its place, and the focus.
  Dashboard.prototype.close = function (quiet) {
    var convo = this.open;
    if (!convo) return;
    this.open = null;
    convo.messages.forEach(function (m) { m.li = null; });
    convo.teacherPending.forEach(function (m) { m.li = null; });
    this.ui.list.textContent = '';
    this.root.setAttribute('data-view', 'list');
    this.ui.pane.hidden = this.ui.sub.hidden = this.ui.ai.hidden = true;
    this.ui.empty.hidden = false;
    setText(this.ui.title, 'No conversation open');
    this.renderRow(convo);
    if (quiet) return;
    if (convo.row) convo.row.button.focus();
    else this.ui.title.focus();
  };

  Dashboard.prototype.renderPane = function () {
    var convo = this.open;
    if (!convo) return;
    var ui = this.ui;
    var name = this.displayName(convo);
    setText(ui.title, name);
    setText(ui.course, convo.course.title);
    ui.state.setAttribute('data-state', convo.state);
    setText(ui.state, STATE_LABEL[convo.state] || STATE_LABEL.idle);
    setText(ui.presence, convo.sessions.size ? '' : 'Left the chat');
    ui.log.setAttribute('aria-label', 'Conversation with ' + name);
    setText(ui.inputLabel, 'Message to ' + name);
    var paused = convo.aiPending !== null ? convo.aiPending : convo.paused === true;
    setText(ui.aiState, convo.paused === true ? 'AI tutor: paused' : 'AI tutor: answering');
    ui.aiState.setAttribute('data-paused', convo.paused === true ? 'true' : 'false');
    setText(ui.aiToggle, convo.aiPending === null ? (paused ? 'Resume AI' : 'Pause AI')
      : (convo.aiPending ? 'Pausing\u2026' : 'Resuming\u2026'));
    ui.aiToggle.setAttribute('aria-label', convo.aiPending === null
      ? (paused ? 'Resume AI tutor for ' : 'Pause AI tutor for ') + name  // the visible words come first
      : ui.aiToggle.textContent);
    ui.attention.hidden = convo.attention.length === 0;
    if (convo.attention.length) {
      setText(ui.attentionText, convo.attention.map(function (a) {
        return (ATTENTION_LABEL[a.kind] || a.kind) + ' at ' + formatTime(a.at.toISOString());
      }).join('; ') + '.');
    }
    ui.older.hidden = !convo.hasMore;
    this.renderControls();
  };

  Dashboard.prototype.renderControls = function () {
    var convo = this.open;
    if (!convo) return;
    this.ui.aiToggle.disabled = !this.ready || convo.aiPending !== null;
  };

  Dashboard.prototype.fetchJson = function (path) {
    return fetch(path, { headers: { Authorization: 'Bearer ' + this.token, Accept: 'application/json' },
      credentials: 'omit', cache: 'no-store' }).then(function (response) {
      if (!response.ok) {
        var error = new Error(response.status === 404 ? 'not found' : 'HTTP ' + response.status);
        error.status = response.status;
        throw error;
      }
      return response.json();
    }, function () {
      throw new Error('network error');
    });
  };

  Dashboard.prototype.messagesPath = function (convo, query) {
    return '/api/teacher/conversations/' + encodeURIComponent(convo.id) + '/messages?' + query;
  };

  Dashboard.prototype.loadTranscript = function (convo, older) {
    if (!convo || convo.loading) return;
    if (older && (convo.oldestId === null || !convo.hasMore)) return;
    convo.loading = true;
    var ui = this.ui;
    var self = this;
    if (older) { ui.older.disabled = true; ui.older.textContent = 'Loading\u2026'; }
    var log = ui.log;
    var fromBottom = log.scrollHeight - log.scrollTop;
    var query = 'limit=' + PAGE + (older ? '&before=' + convo.oldestId : '');
    // The page comes over HTTP and the AI's state changes over the socket: a page read before a change
    // can arrive after the change's frame, and then its `ai_paused` is the older of the two.
    var asked = this.aiFrames;
    this.fetchJson(this.messagesPath(convo, query)).then(function (page) {
      convo.loading = false;
      if (convo !== self.open) return;
      var rows = page && Array.isArray(page.messages) ? page.messages : [];
      if (typeof page.ai_paused === 'boolean' && convo.aiPending === null && convo.aiFrameAt <= asked) {
        convo.paused = page.ai_paused;
      }
      self.merge(convo, rows);
      if (!older || rows.length) convo.hasMore = page.has_more === true;
      convo.loaded = true;
      ui.loadError.hidden = true;
      var streaming = rows.some(function (m) { return m.role === 'assistant' && !FINAL[m.status]; });
      if (!older && streaming && convo.state === 'idle') convo.state = 'streaming';
      convo.messages.forEach(function (m) { if (m.needsText && FINAL[m.status]) self.repair(convo, m); });
      self.renderRow(convo);
      self.renderPane();
      if (older) {
        ui.older.disabled = false;
        ui.older.textContent = 'Load older messages';
        log.scrollTop = log.scrollHeight - fromBottom; // keep what was being read in place
        if (rows.length) self.announce('Loaded ' + rows.length + ' older messages.');
      } else {
        log.scrollTop = log.scrollHeight;
      }
      self.flush();
    }, function (error) {
      convo.loading = false;
      if (convo !== self.open) return;
      ui.older.disabled = false;
      ui.older.textContent = 'Load older messages';
      ui.loadError.hidden = false;
      setText(ui.loadErrorText, 'The earlier messages could not be loaded (' + error.message + '). ' +
        'New messages still appear as they happen.');
      self.announce('The earlier messages could not be loaded.');
      self.flush();
    });
  };

  // The committed text of an answer whose stream this page saw only in part.
  Dashboard.prototype.repair = function (convo, msg) {
    if (msg.repairing || msg.id == null) return;
    msg.repairing = true;
    var self = this;
    this.fetchJson(this.messagesPath(convo, 'limit=1&before=' + (msg.id + 1))).then(function (page) {
      var rows = page && Array.isArray(page.messages) ? page.messages : [];
      self.merge(convo, rows.filter(function (m) { return m && m.id === msg.id; }));
    }, function () { /* keep the partial text; it says so */ }).then(function () {
      msg.repairing = false;
      if (convo === self.open) {
        self.renderMessage(convo, msg);
        if (msg.status === 'complete' && !msg.needsText) {
          self.announce('The tutor answered ' + self.displayName(convo) + ': ' + plainText(msg.text, 200));
        }
      }
    });
  };

  /* -- acting in the conversation --------------------------------------------------------------- */

  Dashboard.prototype.sendTeacherMessage = function () {
    var convo = this.open;
    var text = this.ui.input.value;
    if (!convo || !text.trim()) return;
    this.ui.input.value = '';
    var msg = newMessage('teacher', null, text, 'queued', new Date().toISOString());
    msg.clientId = newId();
    msg.name = typeof this.claims.name === 'string' ? this.claims.name : '';
    convo.teacherPending.set(msg.clientId, msg);
    this.renderMessage(convo, msg);
    this.ui.log.scrollTop = this.ui.log.scrollHeight;
    this.intervene(convo, msg);
    this.ui.input.focus();
  };

  // Sent again after a reconnect under the same id: the server stores it once.
  Dashboard.prototype.intervene = function (convo, msg) {
    var sent = this.ready && this.connection.send({ type: 'intervene', conversation_id: convo.id, text: msg.text,
      id: msg.clientId });
    msg.status = sent ? 'sending' : 'queued';
    if (sent) {
      this.settle(function (o) { return o.ref === msg.clientId; });
      this.pending.push({ kind: 'intervene', ref: msg.clientId, convo: convo, msg: msg });
    }
    if (convo === this.open) this.renderMessage(convo, msg);
  };

  Dashboard.prototype.toggleAi = function () {
    var convo = this.open;
    if (!convo || convo.aiPending !== null || !this.ready) return;
    var paused = convo.paused !== true;
    if (!this.connection.send({ type: 'ai', conversation_id: convo.id, paused: paused })) return;
    convo.aiPending = paused;
    this.pending.push({ kind: 'ai', ref: convo.id, convo: convo, paused: paused });
    this.renderPane();
  };

  /* ---- boot ------------------------------------------------------------------------------------ */

  function boot() {
    var root = document.querySelector('[data-smartedu-teacher]');
    if (!root || root.getAttribute('data-started')) return;
    root.setAttribute('data-started', 'true');
    common.reloadOnNewToken();
    var theme = new URLSearchParams(location.search).get('theme');
    if (theme === 'light' || theme === 'dark') document.documentElement.setAttribute('data-theme', theme);
    var token = readFragment();
    var dashboard = new Dashboard(root, token || '');
    ns.teacher = dashboard;
    if (!token) {
      dashboard.coursesLoaded('Sign in from your school\u2019s site to see your courses.');
      dashboard.signedOut('This page needs a sign-in link. For your safety the sign-in token is removed from the ' +
        'address bar, so reloading signs you out: open the dashboard again from your school\u2019s site.');
      return;
    }
    dashboard.start();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
  else boot();
})();
