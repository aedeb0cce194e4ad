/* SmartEdu Tutor Chat: the last step of an LTI launch.
 * The server put the destination in data-lti-target: a path on this server whose fragment holds the
 * token (fragments never reach servers or Referer headers). location.replace keeps this page, and the
 * LMS's form post behind it, out of the history. The teacher dashboard refuses to be framed, so inside
 * an LMS iframe it is offered as a link that opens a new tab.
 */
(function () {
  'use strict';

  function framed() {
    try {
      return window.self !== window.top;
    } catch (e) {
      return true; // a cross-origin parent: reading window.top is refused
    }
  }

  function sameOrigin(path) {
    try {
      return new URL(path, location.href).origin === location.origin;
    } catch (e) {
      return false;
    }
  }

  function start() {
    var root = document.querySelector('[data-lti-launch]');
    if (!root) return;
    var target = root.getAttribute('data-lti-target') || '';
    root.removeAttribute('data-lti-target');
    var status = root.querySelector('[data-lti-status]');
    // Only a path on this server: never another origin, never a javascript: URL. The check is on the URL
    // the browser makes of it, since browsers drop tabs and newlines ('/\t/host' is '//host').
    if (target.charAt(0) !== '/' || !sameOrigin(target)) {
      if (status) status.textContent = 'The launch could not be completed. Open the tutor again from your course.';
      return;
    }
    if (root.getAttribute('data-lti-window') === 'new' && framed()) {
      var link = root.querySelector('[data-lti-continue]');
      if (link) {
        link.setAttribute('href', target);
        link.hidden = false;
        if (status) status.textContent = 'The teacher dashboard opens in its own tab.';
        return;
      }
    }
    location.replace(target);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
